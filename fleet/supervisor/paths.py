"""Protected paths: gitignore-style globs (on `pathspec`) that an agent's change may never touch."""

from __future__ import annotations

import re
from collections.abc import Sequence

from pathspec import GitIgnoreSpec

# The supervisor's own configuration can never be changed by the agent it supervises, nor can
# .gitattributes (at any depth): its filters and encodings change the bytes git sees.
ALWAYS_PROTECTED: tuple[str, ...] = (
    "supervisor.yaml",
    "supervisor.yml",
    ".fleet-supervisor/**",
    ".gitattributes",
)
# pathspec's patterns use "." (which stops at a newline): a newline in a directory name would
# hide the files below it. Git paths never hold NUL, so it stands in for the newline.
_NEWLINE = "\0"


class ProtectedPaths:
    """The configured globs plus the always-protected ones; `matches("ci/x.cfg")`.

    Globs read as in .gitignore (`**` spans directories, a glob with an inner "/" is anchored
    at the repo root, "dir/" names a directory), with differences that only ever protect more:
    a path is protected when it or any directory above it matches ("ci", "ci/" and "ci/*" all
    protect "ci/sub/gate.sh", "ci/**" protects "ci" itself); each glob counts on its own, so a
    leading "!" or "#" is part of a name, never a negation or a comment that could lift an
    always-protected path; "\\" is a path separator, not an escape; an unclosed "[" is itself.
    """

    def __init__(self, globs: Sequence[str]):
        self.globs = tuple(dict.fromkeys([*ALWAYS_PROTECTED, *(g for g in globs if g.strip())]))
        self._spec = GitIgnoreSpec.from_lines([_gitignore_line(g) for g in self.globs])

    def matches(self, path: str) -> bool:
        path = path.strip("/").replace("\n", _NEWLINE)
        if path == ".git" or path.startswith(".git/"):
            return True
        parts = path.split("/")
        prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
        # Each prefix as a file and as a directory: the guard cannot know which the agent left.
        return any(self._spec.match_file(p) or self._spec.match_file(p + "/") for p in prefixes)


def _gitignore_line(glob: str) -> str:
    """One configured glob as a .gitignore line that means the same on its own."""
    line = glob.strip().replace("\\", "/")
    if line.startswith("./"):
        line = line[2:]
    if line.startswith(("!", "#")):
        line = "\\" + line  # a name, not a negation or a comment
    line = re.sub(r"\[(?![^\]]*\])", r"\\[", line)  # git would match nothing at all
    return line.replace("\n", _NEWLINE)
