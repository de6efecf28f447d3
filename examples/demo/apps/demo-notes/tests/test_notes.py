import unittest

from app.notes import load, normalize_title, word_count


class NotesTests(unittest.TestCase):
    def test_normalize_title_strips(self):
        self.assertEqual(normalize_title("  Groceries "), "groceries")

    def test_load_missing_file(self):
        self.assertEqual(load("/nonexistent/notes.json"), [])

    def test_word_count(self):
        self.assertEqual(word_count("one two"), 2)
