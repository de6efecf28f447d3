import unittest

from app.calc import add, clamp, mean


class CalcTests(unittest.TestCase):
    def test_add(self):
        self.assertEqual(add(2, 3), 5)

    def test_mean(self):
        self.assertEqual(mean([1, 2, 3]), 2)

    def test_clamp(self):
        self.assertEqual(clamp(15, 0, 10), 10)
