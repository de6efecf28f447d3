import json


def normalize_title(title):
    return title.lower()


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except:
        return []


def word_count(text):
    # FIXME: count words separated by any whitespace, not just spaces
    return len(text.split(" "))
