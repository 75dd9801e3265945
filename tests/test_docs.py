"""Every code snippet in the documentation runs, and the site builds with ``mkdocs build --strict``.

The pages are docs/**/*.md and README.md. What happens to each fenced block:

- ```python: executed. The blocks of one page share one namespace, in order (like a notebook),
  in a fresh working directory (the sandbox, below), so a page reads top to bottom as a session.
- ```bash: every command that starts with ``peftloop`` runs in-process through
  ``peftloop.cli.main`` in the sandbox, in order, so a command may use what an earlier one wrote.
  ``peftloop train`` gets ``--max_steps 2`` appended (the only change: a tiny run of the same
  command). ``torchrun ... -m peftloop ...`` and ``python -m peftloop ...`` are parsed and
  validated by the CLI (every option and config value checked) but not run. Other commands
  (pip, pytest, python -m benchmarks...) are not peftloop's and are left alone.
- ```toml: read with ``peftloop.config.load_toml`` and every section validated by its dataclass.
- ```json: must parse (the JSONL records of docs/data.md).

An HTML comment on the line before a block (invisible on the site) changes that:

- ``<!-- docs-test: file PATH -->``: also write the block to PATH in the sandbox (a TOML file
  a later command reads).
- ``<!-- docs-test: excerpt FILE -->``: the block quotes FILE (e.g. peftloop/train.py): every
  line of it must be a line of FILE, in the same order (``...`` lines mark elisions). The
  quoted code runs in the loop's own tests; this keeps the quotation true.
- ``<!-- docs-test: parse-only REASON -->`` (bash): parse and validate, do not run.
- ``<!-- docs-test: signatures REASON -->`` (python): code of another library that cannot run
  here (the Trainer + PEFT scripts of the migration guide need the real weights and a GPU).
  Not run, but every keyword argument of every call to a name it imports must be a parameter
  of that callable in the installed library, so the script shown is one that would run.
- ``<!-- docs-test: skip REASON -->``: not run; the reason is required. Kept rare.

Every page runs at least one block (python executed, a ``peftloop`` command run or validated, a
TOML file validated), or is listed in PAGES_WITHOUT_SNIPPETS with the reason it has none: a page
whose blocks are all filtered out cannot pass without having been tested.

The sandbox, built once: ``peftloop-demo/base`` (the demo's base model, as ``peftloop train``
writes it), ``train.jsonl`` (prompt/completion records), ``data/train.jsonl``, ``data/chat.jsonl``
(conversations) and an offline Hugging Face hub cache (``HF_HUB_CACHE``, ``HF_HUB_OFFLINE=1``)
in which every hub id the docs name (``HuggingFaceTB/SmolLM2-135M``, ``meta-llama/Llama-2-7b-hf``,
...) is a tiny random Qwen2-shaped model with a ChatML tokenizer. So ``peftloop train --model
meta-llama/Llama-2-7b-hf ...`` runs as written, on a stand-in of the same name.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_hooks" not in p.parts) + [ROOT / "README.md"]
TINY_TRAIN = ["--max_steps", "2"]

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,})(?P<lang>[\w+-]*)[^\n`]*$")
DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<kind>[\w-]+)\s*(?P<arg>.*?)\s*-->\s*$")
DIRECTIVES = ("file", "excerpt", "parse-only", "signatures", "skip")


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    directive: str | None = None
    arg: str = ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks_of(page: Path) -> list[Block]:
    """The fenced blocks of a page, each with the docs-test directive on the line before it."""
    lines = page.read_text(encoding="utf-8").splitlines()
    out, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m["indent"], m["fence"]
        j = i + 1
        while j < len(lines) and not (lines[j].startswith(indent + fence) and not lines[j].strip("` \t")):
            j += 1
        body = [line[len(indent):] if line.startswith(indent) else line.lstrip() for line in lines[i + 1:j]]
        block = Block(page, i + 1, m["lang"].lower(), "\n".join(body) + "\n")
        k = i - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        d = DIRECTIVE.match(lines[k]) if k >= 0 else None
        if d:
            block.directive, block.arg = d["kind"], d["arg"]
        out.append(block)
        i = j + 1
    return out


def commands_of(code: str) -> list[list[str]]:
    """Shell commands of a bash block: continuation lines joined, comments dropped, split at
    ``&&``, ``||``, ``;`` and ``|``."""
    out = []
    for line in re.sub(r"\\\n", " ", code).splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        words: list[str] = []
        for token in [*lexer, ";"]:
            if token in ("&&", "||", ";", "|", "&"):
                if words:
                    out.append(words)
                words = []
            else:
                words.append(token)
    return out


def peftloop_argv(words: list[str]) -> tuple[list[str] | None, bool]:
    """(the argv of peftloop's CLI, whether it can run here) for a peftloop command, else (None, _)."""
    if words[0] == "peftloop":
        return words[1:], True
    if "-m" in words:
        i = words.index("-m")
        if i + 1 < len(words) and words[i + 1] == "peftloop":
            return words[i + 2:], False  # torchrun / python -m: parsed, not launched
    return None, False


# --------------------------------------------------------------------------------------------
# The sandbox


# A hub id: after --model/--base, first argument of load_pretrained/from_pretrained, or name_or_path.
HUB_ID = re.compile(r'(?:--model|--base)[ =]+([\w.-]+/[\w.-]+)(?=[\s`"]|$)'
                    r'|(?:load_pretrained|from_pretrained)\(\s*"([^"/]+/[^"/]+)"'
                    r'|name_or_path\s*=\s*"([^"/]+/[^"/]+)"')
LOCAL_PREFIXES = ("runs/", "peftloop-demo/", "data/", "merged", "out/", "./", "../")


def hub_ids() -> list[str]:
    """Every hub id the pages load (a name with one slash that is not a path the docs write)."""
    found = set()
    for page in PAGES:
        for m in HUB_ID.finditer(page.read_text(encoding="utf-8")):
            name = next(g for g in m.groups() if g)
            if not name.startswith(LOCAL_PREFIXES):
                found.add(name)
    return sorted(found)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from tests.helpers import QA, qa_records, save_chat_base, save_demo_base, write_jsonl
    from tests.hf_builders import install_in_hub_cache

    root = tmp_path_factory.mktemp("docs-assets")
    files = root / "files"
    save_demo_base(files / "peftloop-demo" / "base")  # as `peftloop train` (the demo) writes it
    # data
    (files / "data").mkdir(parents=True)
    for path in (files / "train.jsonl", files / "data" / "train.jsonl", files / "eval.jsonl"):
        write_jsonl(path, qa_records(16))
    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in QA]
    write_jsonl(files / "data" / "chat.jsonl", chats * 16)
    # one tiny stand-in model for every hub id the docs name
    save_chat_base(root / "stand-in", max_position_embeddings=256, initializer_range=0.02)
    for repo_id in hub_ids():
        install_in_hub_cache(root / "hub", repo_id, root / "stand-in")
    return root


@pytest.fixture
def sandbox(assets, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(assets / "files", work)
    monkeypatch.chdir(work)
    monkeypatch.setenv("HF_HUB_CACHE", str(assets / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HOME", raising=False)
    # huggingface_hub reads the environment once, at import; an earlier test may have imported it.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(assets / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return work


# --------------------------------------------------------------------------------------------
# Running blocks


def run_cli(argv: list[str], where: str, run: bool) -> None:
    """peftloop's CLI in-process; parse-only replaces the work of each command by validation.
    A search is never run for real here (minutes of trials): it validates its config, its space
    and every value the space can give (``check_only``), or with parse-only its arguments alone."""
    from peftloop import cli, search

    out, err = io.StringIO(), io.StringIO()
    patches = {"run_search": functools.partial(search.run_search, check_only=True)}
    if not run:
        def validate_train(args, rest):
            sections = cli.train_sections(args, rest)
            for name, cls in cli.SCHEMA.items():
                cli.build(cls, sections[name], name, args.config or "command line")
            return 0

        patches = {"_train": validate_train, "_generate": lambda args: 0, "_merge": lambda args: 0,
                   "run_search": lambda args, rest: 0}
    saved = {name: getattr(cli, name) for name in patches}
    try:
        for name, fn in patches.items():
            setattr(cli, name, fn)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = cli.main(argv)
            except SystemExit as e:  # argparse errors
                rc = e.code
    finally:
        for name, fn in saved.items():
            setattr(cli, name, fn)
    assert rc == 0, f"{where}: `peftloop {shlex.join(argv)}` exited {rc}\n{err.getvalue()[-3000:]}"


def check_excerpt(block: Block) -> None:
    source = ROOT / block.arg
    assert source.is_file(), f"{block.where}: excerpt of {block.arg}, which does not exist"
    lines = [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]
    at = 0
    for quoted in block.code.splitlines():
        quoted = quoted.strip()
        if not quoted or quoted in ("...", "# ..."):
            continue
        try:
            at = lines.index(quoted, at) + 1
        except ValueError:
            raise AssertionError(f"{block.where}: this line is not in {block.arg} (after the lines quoted "
                                 f"before it):\n    {quoted}") from None


def check_signatures(block: Block) -> None:
    """Keyword arguments of calls to imported callables must be real parameters (see the module doc)."""
    import ast
    import importlib
    import inspect

    tree = ast.parse(block.code)
    imported = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                imported[alias.asname or alias.name] = (node.module, alias.name)
    checked = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        chain, func = [], node.func
        while isinstance(func, ast.Attribute):
            chain.insert(0, func.attr)
            func = func.value
        if not isinstance(func, ast.Name) or func.id not in imported:
            continue
        module, name = imported[func.id]
        try:
            obj = getattr(importlib.import_module(module), name)
        except ImportError as e:  # the 'ref' extra is not installed: nothing to check against
            warnings.warn(f"{block.where}: {module} is not installed, signatures not checked ({e})",
                          stacklevel=1)
            return
        for attr in chain:
            obj = getattr(obj, attr)
        params = inspect.signature(obj).parameters
        if chain[-1:] == ["from_pretrained"]:
            continue  # forwards **kwargs to the config and the model
        for kw in node.keywords:
            assert kw.arg in params, (f"{block.where}: {'.'.join([func.id, *chain])}() has no parameter "
                                      f"{kw.arg!r} in the installed {module.split('.')[0]}")
            checked += 1
    assert checked, f"{block.where}: no keyword argument of an imported callable to check"


SHELLS = ("bash", "sh", "shell", "console")
# What makes a page tested: python executed, a peftloop command run or validated, a TOML file validated.
# (JSON records parsed, excerpts compared, signatures checked are checks too, but no block runs.)
RUNS = ("python", "peftloop", "toml")

API_REFERENCE = ("API reference: only `:::` entries that mkdocstrings renders from the docstrings; "
                 "test_mkdocs_build_strict fails if any object they name does not resolve")
# Pages with no block that runs, and why. A page listed here that gains one must leave the list.
PAGES_WITHOUT_SNIPPETS = {
    "docs/api/checkpoint.md": API_REFERENCE,
    "docs/api/config.md": API_REFERENCE,
    "docs/api/data.md": API_REFERENCE,
    "docs/api/lora.md": API_REFERENCE,
    "docs/api/models.md": API_REFERENCE,
    "docs/api/train.md": API_REFERENCE,
    "docs/architecture.md": ("the layer table, no code; tests/test_layering.py reads the table and checks "
                             "every module's imports against it"),
    "docs/benchmarks.md": ("its commands run the benchmark suite (python -m benchmarks.*: minutes, the "
                           "'bench' extra); tests/test_benchmarks.py runs every benchmark's --help, the "
                           "harness on the small shape and the results scheme"),
    "docs/reliability.md": ("prose about guarantees, no code; each guarantee is tested in "
                            "tests/test_faults.py, tests/test_checkpoint.py and tests/test_hostile_*.py"),
}


def checks_of(block: Block) -> Counter:
    """What run_page does with a block, by kind: "python" (executed), "peftloop" (one per
    command, run or validated), "toml", "json", "excerpt", "signatures"; empty for nothing."""
    if block.directive == "skip":
        return Counter()
    if block.directive in ("excerpt", "signatures"):
        return Counter([block.directive])
    if block.lang in ("python", "toml", "json"):
        return Counter([block.lang])
    if block.lang in SHELLS:
        return Counter(peftloop=sum(peftloop_argv(words)[0] is not None for words in commands_of(block.code)))
    return Counter()


def planned(page: Path) -> Counter:
    """What run_page will do with a page (read from the page, nothing run)."""
    return sum((checks_of(block) for block in blocks_of(page)), Counter())


def runs(counts: Counter) -> int:
    return sum(counts[kind] for kind in RUNS)


def run_page(page: Path) -> Counter:
    """Run every block of a page (see the module doc); returns what ran, by kind (as checks_of)."""
    from peftloop.cli import SCHEMA
    from peftloop.config_io import build, load_toml

    namespace = {"__name__": "__docs__"}
    ran = Counter()
    for block in blocks_of(page):
        if block.directive is not None:
            assert block.directive in DIRECTIVES, (f"{block.where}: unknown docs-test directive "
                                                   f"{block.directive!r}")
        if block.directive == "skip":
            assert block.arg, f"{block.where}: `docs-test: skip` needs a reason"
            continue
        if block.directive == "file":
            path = Path(block.arg)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.code, encoding="utf-8")
        if block.directive == "excerpt":
            check_excerpt(block)
            ran["excerpt"] += 1
            continue
        if block.directive == "signatures":
            assert block.arg, f"{block.where}: `docs-test: signatures` needs a reason"
            check_signatures(block)
            ran["signatures"] += 1
            continue
        if block.lang == "python":
            code = "\n" * block.line + block.code  # tracebacks point at the page's own lines
            t0 = time.perf_counter()
            exec(compile(code, str(page), "exec"), namespace)
            if os.environ.get("DOCS_TIMING"):
                print(f"{time.perf_counter() - t0:6.2f}s {block.where} python")
            ran["python"] += 1
        elif block.lang in SHELLS:
            for words in commands_of(block.code):
                argv, runnable = peftloop_argv(words)
                if argv is None:
                    continue
                if block.directive == "parse-only":
                    assert block.arg, f"{block.where}: `docs-test: parse-only` needs a reason"
                    runnable = False
                if runnable and argv[:1] == ["train"]:
                    argv = [*argv, *TINY_TRAIN]
                t0 = time.perf_counter()
                run_cli(argv, block.where, runnable)
                if os.environ.get("DOCS_TIMING"):
                    print(f"{time.perf_counter() - t0:6.2f}s {block.where} peftloop {shlex.join(argv)}")
                ran["peftloop"] += 1
        elif block.lang == "toml":
            path = Path(block.arg) if block.directive == "file" else Path("snippet.toml")
            if block.directive != "file":
                path.write_text(block.code, encoding="utf-8")
            sections = load_toml(path)
            for name, values in sections.items():
                build(SCHEMA[name], values, name, block.where)
            ran["toml"] += 1
        elif block.lang == "json":
            assert isinstance(json.loads(block.code), dict), f"{block.where}: a record must be a JSON object"
            ran["json"] += 1
    return ran


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_every_snippet_of_the_page_runs(page, sandbox):
    name = str(page.relative_to(ROOT))
    ran = run_page(page)
    assert ran == planned(page), f"{name}: ran {dict(ran)}, the page has {dict(planned(page))}"
    assert runs(ran) > 0 or name in PAGES_WITHOUT_SNIPPETS, f"{name}: no block ran"


def test_every_page_runs_a_snippet_or_says_why_not():
    """The fast half of the check above: read from the pages, so a page whose blocks would all be
    filtered out fails here without building anything."""
    pages = {str(p.relative_to(ROOT)): p for p in PAGES}
    unknown = set(PAGES_WITHOUT_SNIPPETS) - set(pages)
    assert not unknown, f"PAGES_WITHOUT_SNIPPETS names pages that do not exist: {sorted(unknown)}"
    for name, page in pages.items():
        counts = planned(page)
        reason = PAGES_WITHOUT_SNIPPETS.get(name)
        if reason is None:
            assert runs(counts) > 0, (f"{name}: no block runs (it has {dict(counts) or 'no code'}): add a "
                                      f"python, peftloop or toml block, or list the page in "
                                      f"PAGES_WITHOUT_SNIPPETS with the reason it has none")
        else:
            assert runs(counts) == 0, f"{name} runs {dict(counts)}: take it out of PAGES_WITHOUT_SNIPPETS"
            if reason is API_REFERENCE:
                assert "\n::: " in page.read_text(encoding="utf-8"), f"{name} has no `:::` API entry"


def test_the_pages_have_snippets_and_few_exclusions():
    blocks = [b for page in PAGES for b in blocks_of(page)]
    code = [b for b in blocks if b.lang in ("python", "bash", "toml", "json")]
    skipped = [b.where for b in code if b.directive == "skip"]
    assert len(code) > 40, len(code)
    assert len(skipped) <= 3, f"too many skipped snippets: {skipped}"


def test_the_parser_sees_directives_and_commands(tmp_path):
    page = tmp_path / "p.md"
    page.write_text("text\n\n<!-- docs-test: file run.toml -->\n```toml\n[train]\nseed = 1\n```\n\n"
                    "  ```bash\n  peftloop train --model a/b \\\n      --r 8  # rank\n"
                    "  pip install x && peftloop merge --base a/b --adapter x --out y\n  ```\n")
    toml, bash = blocks_of(page)
    assert (toml.lang, toml.directive, toml.arg, toml.line) == ("toml", "file", "run.toml", 4)
    assert bash.directive is None
    assert commands_of(bash.code) == [["peftloop", "train", "--model", "a/b", "--r", "8"],
                                      ["pip", "install", "x"],
                                      ["peftloop", "merge", "--base", "a/b", "--adapter", "x", "--out", "y"]]
    torchrun = ["torchrun", "--nproc-per-node", "8", "-m", "peftloop", "train"]
    assert peftloop_argv(torchrun) == (["train"], False)


# --------------------------------------------------------------------------------------------
# The migration guide names real fields


def _table_rows(text: str, heading: str) -> list[list[str]]:
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        if line.startswith("|") and not set(line) <= set("|-: "):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows[1:]  # without the header


def _names(cell: str) -> list[str]:
    return re.findall(r"`([\w.]+)", cell)


def test_the_migration_tables_name_real_fields():
    """Left column: fields of TrainingArguments / peft.LoraConfig; right column: peftloop fields."""
    import dataclasses

    from peftloop.cli import SCHEMA

    ours = {f"{section}.{f.name}" for section, cls in SCHEMA.items() for f in dataclasses.fields(cls)}
    text = (DOCS / "migration.md").read_text(encoding="utf-8")
    theirs = {}
    try:
        import peft
        import transformers

        theirs["## TrainingArguments"] = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
        theirs["## peft.LoraConfig"] = {f.name for f in dataclasses.fields(peft.LoraConfig)}
        import inspect

        bnb = set(inspect.signature(transformers.BitsAndBytesConfig).parameters)
        theirs["## BitsAndBytesConfig"] = bnb | {"from_pretrained", "name", "revision", "cache_dir", "dtype"}
    except ImportError:
        pass
    checked = 0
    for heading in ("## TrainingArguments", "## peft.LoraConfig", "## BitsAndBytesConfig"):
        for row in _table_rows(text, heading):
            for name in _names(row[1]):
                if "." in name and name.split(".")[0] in SCHEMA:
                    assert name in ours, f"migration.md ({heading}): peftloop has no field {name}"
                    checked += 1
            if heading in theirs:
                for name in _names(row[0]):
                    assert name in theirs[heading], f"migration.md ({heading}): {name} is not a field there"
    assert checked > 30, checked


# --------------------------------------------------------------------------------------------
# The site


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    """What CI checks: every page in the nav exists, every link and anchor resolves, the API
    reference finds every object it names."""
    missing = [m for m in ("mkdocs", "material", "mkdocstrings_handlers.python") if not _module_available(m)]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install -e '.[docs]'): the site is not built")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    argv = [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")]
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-6000:]
    built = sorted(p.relative_to(tmp_path / "site") for p in (tmp_path / "site").rglob("index.html"))
    assert len(built) >= 20, built


def _module_available(name: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False
