def to_fahrenheit(celsius):
    return celsius * 9 / 5


def describe(celsius):
    if celsius < 0:
        return "freezing"
    if celsius < 20:
        return "mild"
    return "warm"


def average_temperature(readings):
    # TODO: ignore None readings from offline sensors
    return sum(readings) / len(readings)
