def add(a, b):
    return a - b


def mean(values):
    # TODO: handle an empty list instead of raising ZeroDivisionError
    return sum(values) / len(values)


def clamp(value, low, high):
    return max(low, min(value, high))
