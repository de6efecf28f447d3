import unittest

from app.weather import describe, to_fahrenheit


class WeatherTests(unittest.TestCase):
    def test_to_fahrenheit(self):
        self.assertEqual(to_fahrenheit(100), 212)

    def test_describe(self):
        self.assertEqual(describe(-5), "freezing")
