"""Demo agent: stands in for Claude/Codex with real tools on a real git repo.

    agent.py skill  REPO [PROMPT]  lint the app (ast) and answer with a structured task block
    agent.py review REPO [PROMPT]  run the app's tests; each failure becomes an ISSUE block
    agent.py evolve REPO [PROMPT]  apply the fixes the agent "knows" (.demo/fixes.json) + docstrings
    agent.py ship   REPO           archive HEAD as the build an upload step would send

Demo only: production fleets point the fleet file's commands at real agents.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import tarfile
from pathlib import Path

START, END = "<!-- EVOLUTION_TASKS_START -->", "<!-- EVOLUTION_TASKS_END -->"


def sources(repo: Path) -> list[Path]:
    return sorted(p for p in (repo / "app").rglob("*.py") if p.stat().st_size)


def lint(repo: Path) -> list[dict]:
    """Real findings from the code: missing docstrings, TODO/FIXME notes, bare excepts."""
    tasks = []
    for path in sources(repo):
        rel = str(path.relative_to(repo))
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) is None:
                tasks.append(
                    {
                        "priority": 4,
                        "file": rel,
                        "description": f"Document what {node.name}() does in a docstring.",
                    }
                )
            if isinstance(node, ast.ExceptHandler) and node.type is None:
                tasks.append(
                    {
                        "priority": 2,
                        "file": rel,
                        "description": f"Replace the bare except on line {node.lineno}"
                        " with the errors it expects.",
                    }
                )
        for n, line in enumerate(text.splitlines(), 1):
            note = re.search(r"#\s*(TODO|FIXME):?\s*(.+)", line)
            if note:
                tasks.append(
                    {
                        "priority": 3 if note[1] == "TODO" else 2,
                        "file": rel,
                        "description": f"{note[2].strip().capitalize()} (line {n}).",
                    }
                )
    return tasks


def skill(repo: Path, prompt: str) -> None:
    tasks = lint(repo)
    print(f"Forge pass over {repo.name}: read {len(sources(repo))} source file(s).")
    for t in tasks:
        print(f"- {t['file']}: {t['description']}")
    prose_only = (repo / ".demo" / "skill-prose-only").exists() and START not in prompt
    if not prose_only:
        print(START)
        print(json.dumps(tasks, indent=2))
        print(END)


def run_tests(repo: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "unittest", "discover", "-s", "tests", "-t", "."],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=300,
    )


def review(repo: Path, prompt: str) -> None:
    result = run_tests(repo)
    issues = []
    for block in re.split(r"^=+$", result.stderr, flags=re.M):
        head = re.search(r"^(FAIL|ERROR): (\w+)", block, flags=re.M)
        if not head:
            continue
        root = str(repo) + "/"
        files = [f for f in re.findall(r'File "([^"]+)"', block) if f.startswith(root)]
        files.sort(key=lambda f: "/app/" in f)  # blame the app code over the test when both appear
        where = files[-1].removeprefix(root) if files else "tests"
        detail = (re.findall(r"^\w*Error: (.+)$", block, flags=re.M) or ["see the test output"])[-1]
        issues.append(
            {
                "file": where,
                "severity": "high" if head[1] == "FAIL" else "critical",
                "description": f"Make {head[2]} pass: {detail}",
            }
        )
    for t in lint(repo):
        if "bare except" in t["description"]:
            issues.append(
                {"file": t["file"], "severity": "medium", "description": t["description"]}
            )
    print(f"Adversarial review of {repo.name} (tests exit {result.returncode}).")
    for i in issues:
        print(f"ISSUE FILE: {i['file']} SEVERITY: {i['severity']} FIX: {i['description']}")
    print(json.dumps({"issues": issues}))


def add_docstrings(path: Path) -> None:
    lines = path.read_text().splitlines()
    tree = ast.parse("\n".join(lines))
    missing = [
        n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and ast.get_docstring(n) is None
    ]
    for node in sorted(missing, key=lambda n: n.lineno, reverse=True):
        indent = " " * (node.body[0].col_offset)
        words = node.name.replace("_", " ")
        lines.insert(node.lineno, f'{indent}"""{words.capitalize()}."""')  # right under the def
    path.write_text("\n".join(lines) + "\n")


def evolve(repo: Path, prompt: str) -> None:
    for fix in json.loads((repo / ".demo" / "fixes.json").read_text()):
        if fix.get("unless_told") and fix["unless_told"] in prompt:
            print(f"skipping {fix['file']}: told it is off-limits")
            continue
        target = repo / fix["file"]
        target.write_text(target.read_text().replace(fix["find"], fix["replace"]))
        print(f"edited {fix['file']}")
    for path in sources(repo):
        add_docstrings(path)
    print(f"evolved {repo.name}")


def ship(repo: Path) -> None:
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dist = repo.parent / "dist"
    dist.mkdir(exist_ok=True)
    build = dist / f"{repo.name}-{head}.tar.gz"
    with tarfile.open(build, "w:gz") as tar:
        for path in sources(repo):
            tar.add(path, arcname=str(path.relative_to(repo)))
    print(
        f"uploaded build {build.name} (demo: production runs archive + upload on the ship target)"
    )


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in {"skill", "review", "evolve", "ship"}:
        print(__doc__, file=sys.stderr)
        return 2
    mode, repo, prompt = argv[0], Path(argv[1]).resolve(), " ".join(argv[2:])
    {"skill": skill, "review": review, "evolve": evolve}.get(mode, lambda r, p: ship(r))(
        repo, prompt
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
