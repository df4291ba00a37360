"""`emoq finetune` never loses a user's data, and fails early in one line (issue 8, items 1, 5, 9).

Every test here runs with ``shutil.rmtree`` guarded: whatever the code under test does, nothing
outside the test's own temporary directory can be removed.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("peft")

from emoq.cli import main  # noqa: E402
from emoq.recipes.config import Recipe, RecipeError, load_recipe  # noqa: E402
from emoq.recipes.data import load_examples, split, tokenize  # noqa: E402
from tests.tiny_llm import char_tokenizer, save_tiny_llama  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARTICLES = [f"Article {i}: " + " ".join(f"w{j}" for j in range(20 + 4 * i)) + "." for i in range(24)]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working directory with canary files, HOME inside the test dir, and a guarded rmtree."""
    real_rmtree = shutil.rmtree

    def guarded_rmtree(path, *args, **kwargs):
        if not Path(path).resolve().is_relative_to(tmp_path.resolve()):
            raise AssertionError(f"rmtree({path!r}) outside the test directory")
        return real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", guarded_rmtree)
    home, cwd = tmp_path / "home", tmp_path / "home" / "project"
    cwd.mkdir(parents=True)
    for folder in (home, cwd):
        (folder / "canary.txt").write_text("user data")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    return cwd


@pytest.fixture
def no_model_load(monkeypatch):
    """Loading a model fails the test: the checks must come before it."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the recipe was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def tiny_args(tiny_dir, out, *extra, recipe_dir=None):
    recipe = Path(recipe_dir or Path(out).parent) / "tiny.yaml"
    recipe.parent.mkdir(parents=True, exist_ok=True)
    recipe.write_text("# everything from --set\n")
    return ["finetune", "--no-progress", str(recipe), "--set", f"model={tiny_dir}", "--set", f"output_dir={out}",
            "--set", "max_steps=2", "--set", "eval_size=8", "--set", "max_train_samples=16", "--set", "seq_len=96",
            "--set", "eval_batch_size=4", *extra]


def one_line_error(capsys, key):
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress output of the libraries
    assert err.startswith("emoq finetune: error: "), err
    assert f"'{key}'" in err, err
    return err


# ---------------------------------------------------------------- item 1: output_dir
def dangerous(cwd):
    (cwd / "afile.txt").write_text("mine")
    (cwd / "theirs").mkdir()
    (cwd / "theirs" / "notes.txt").write_text("mine")
    (cwd / "link").symlink_to(cwd / "theirs")
    return {".": ".", "home": "~/", "root": "/", "parent": "..", "ancestor": str(cwd.parent.parent),
            "file": "afile.txt", "foreign_dir": "theirs", "symlink": "link"}


@pytest.mark.parametrize("case", ["."] + ["home", "root", "parent", "ancestor", "file", "foreign_dir", "symlink"])
def test_unsafe_output_dirs_are_refused_before_loading(case, tiny_dir, sandbox, no_model_load, capsys):
    # Old behaviour: output_dir=. with overwrite=true trained, then removed the current directory
    # (the user's files), then failed; an existing file trained the whole run, then failed.
    out = dangerous(sandbox)[case]
    args = tiny_args(tiny_dir, out, "--set", "overwrite=true", recipe_dir=sandbox.parent.parent / "recipes")
    before = sorted(p.relative_to(sandbox.parent.parent) for p in sandbox.parent.parent.rglob("*"))
    assert main(args) == 2
    one_line_error(capsys, "output_dir")
    after = sorted(p.relative_to(sandbox.parent.parent) for p in sandbox.parent.parent.rglob("*"))
    assert after == before  # nothing removed, nothing left behind
    assert (sandbox / "canary.txt").read_text() == "user data"


def test_output_dir_that_cannot_be_created(tiny_dir, sandbox, no_model_load, capsys):
    (sandbox / "afile.txt").write_text("mine")
    assert main(tiny_args(tiny_dir, "afile.txt/run", recipe_dir=sandbox.parent)) == 2
    one_line_error(capsys, "output_dir")
    locked = sandbox / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):
        return  # root writes anywhere: the permission case cannot be made here
    assert main(tiny_args(tiny_dir, "locked/sub/run", recipe_dir=sandbox.parent)) == 2
    one_line_error(capsys, "output_dir")
    assert sorted(p.name for p in sandbox.iterdir()) == ["afile.txt", "canary.txt", "locked"]


def test_plain_text_run_overwrite_and_permissions(tiny_dir, sandbox, monkeypatch, capsys):
    # A user's own text: one article per line in a file with an unusual extension (was
    # FileNotFoundError from datasets); packed into seq_len blocks (was: cut at seq_len, the rest
    # thrown away); the plot names the model (was the folder name); the output directory is
    # created with the user's umask (was 0700); overwrite replaces only emoq's own output.
    import emoq.recipes.run as run

    titles = []
    real_plot = run.plot
    monkeypatch.setattr(run, "plot", lambda history, path, title, evals: (titles.append(title),
                                                                          real_plot(history, path, title, evals)))
    news = sandbox / "news.cor"
    news.write_text("\n".join(ARTICLES) + "\n\n")
    old_umask = os.umask(0o022)
    try:
        args = tiny_args(tiny_dir, "runs/news", "--set", f"data={news}", "--set", "text_field=text",
                         "--set", "max_train_samples=1000", recipe_dir=sandbox.parent)
        assert main(args) == 0
    finally:
        os.umask(old_umask)
    out = sandbox / "runs" / "news"
    metrics = json.loads((out / "metrics.json").read_text())
    tok = char_tokenizer()
    tokens = sum(len(tok(a)["input_ids"]) + 1 for a in ARTICLES)  # every article and its eos
    assert metrics["train_examples"] + metrics["held_out_examples"] >= tokens // 96  # packed, nothing dropped
    assert metrics["model"].startswith("LlamaForCausalLM (") and titles and "LlamaForCausalLM" in titles[0]
    assert tiny_dir.name not in titles[0]
    assert (out.stat().st_mode & 0o777) == 0o755 and (out.parent.stat().st_mode & 0o777) == 0o755
    assert json.loads((out / ".emoq-output.json").read_text())["entries"] == ["adapter", "metrics.json",
                                                                              "loss_pulse.png"]
    # overwrite: an earlier emoq output is replaced ...
    assert main(args) == 2 and "overwrite" in capsys.readouterr().err
    stamp = (out / "metrics.json").stat().st_mtime_ns
    assert main(args + ["--set", "overwrite=true"]) == 0
    assert (out / "metrics.json").stat().st_mtime_ns != stamp
    # ... but not once the user has put something of theirs into it
    (out / "my-notes.txt").write_text("mine")
    assert main(args + ["--set", "overwrite=true"]) == 2
    assert "my-notes.txt" in one_line_error(capsys, "output_dir")
    assert (out / "my-notes.txt").read_text() == "mine" and (out / "adapter").is_dir()
    assert sorted(p.name for p in out.parent.iterdir()) == ["news"]  # no partial folder left


KILLED_RUN = """
import sys, time, transformers
from emoq.cli import main
def hang(self, *a, **k):
    open(sys.argv[2], "w").write("training")
    time.sleep(600)
transformers.Trainer.train = hang
main(sys.argv[3:])
"""


def test_a_killed_run_leaves_nothing_the_next_run_does_not_remove(tiny_dir, sandbox, capsys):
    # Old behaviour: a SIGKILL left an empty .NAME.partial-* beside the output for ever.
    started = sandbox / "started"
    args = tiny_args(tiny_dir, str(sandbox / "runs" / "run"), recipe_dir=sandbox.parent)
    proc = subprocess.Popen([sys.executable, "-c", KILLED_RUN, "x", str(started), *args], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        deadline = time.monotonic() + 300
        while not started.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert started.exists(), "the child run did not reach training"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    left = [p.name for p in (sandbox / "runs").iterdir()]
    assert len(left) == 1 and left[0].startswith(".run.partial-")
    # the next run (here: one refused for another reason, after its output checks) removes it
    assert main(tiny_args(tiny_dir, str(sandbox / "runs" / "run"), "--set", "lora_target=nothing_matches",
                          recipe_dir=sandbox.parent)) == 2
    assert "matches no layer" in one_line_error(capsys, "lora_target")
    assert list((sandbox / "runs").iterdir()) == []


def test_stale_model_cache_partials_are_removed(tmp_path):
    # Old behaviour: a killed first-run GGUF re-save left ~/.cache/emoq/models/.partial-* (538 MB).
    from emoq.recipes.model import resolve_model_dir
    from emoq.recipes.output import partial_name

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    models = tmp_path / "cache" / "models"
    cached = models / "m"
    cached.mkdir(parents=True)
    (cached / "config.json").write_text("{}")
    (cached / "model.safetensors").write_text("")
    stale = models / partial_name("").replace(f"-{os.getpid()}-", f"-{proc.pid}-")
    live = models / partial_name("")  # this process: a re-save in progress, kept
    for d in (stale, live):
        d.mkdir()
        (d / "model.safetensors").write_text("x" * 100)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.gguf").write_text("")
    recipe = Recipe(model=str(tmp_path / "src"), gguf_file="m.gguf", cache_dir=str(tmp_path / "cache"))
    assert resolve_model_dir(recipe) == str(cached)
    assert not stale.exists() and live.exists()


# ---------------------------------------------------------------- item 5: errors before loading
@pytest.mark.parametrize("override,key", [
    ("weight_decay=.nan", "weight_decay"), ("optimizer_kwargs={lr: 5.0e-5}", "optimizer_kwargs"),
    ("optimizer_kwargs={lr: 5e-5}", "optimizer_kwargs"), ("text_sample_by=word", "text_sample_by"),
    ("optimizer_kwargs={state_precision: 8bit, use_shadow: 'no'}", "optimizer_kwargs"), ("output_dir=", "output_dir"),
])
def test_more_values_are_checked_at_validation(override, key):
    with pytest.raises(RecipeError) as err:
        load_recipe(None, [override])
    assert f"'{key}'" in str(err.value) and "\n" not in str(err.value)


def test_yaml_numbers_are_read_as_users_mean_them():
    # YAML 1.1 (PyYAML) reads 5e-5 as the string "5e-5"; a user means a number.
    r = load_recipe(None, ["optimizer_kwargs={lr: 2e-1, weight_decay: 1e-2}"])
    assert r.optimizer_kwargs == {"lr": 0.2, "weight_decay": 0.01}
    with pytest.raises(RecipeError, match="'max_steps' must be int"):
        load_recipe(None, ["max_steps=1e3"])


def test_recipe_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_bytes("max_steps: 5\nmodel: caf\xe9\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="not UTF-8"):
        load_recipe(path)


@pytest.mark.parametrize("override,key,match", [
    ("model=./no/such/model", "model", "does not exist"), ("data=./no/such/data.txt", "data", "does not exist"),
    ("seq_len=8", "seq_len", "no held-out example"), ("seq_len=4096", "seq_len", "max_position_embeddings"),
])
def test_errors_found_before_the_model_loads(override, key, match, tiny_dir, sandbox, no_model_load, capsys):
    # Old behaviour: each loaded the model, then ended in a traceback (seq_len=32 on the default
    # recipe: every row dropped, then KeyError: 'eval_loss').
    assert main(tiny_args(tiny_dir, "runs/x", "--set", override, recipe_dir=sandbox.parent)) == 2
    assert match in one_line_error(capsys, key)
    assert sorted(p.name for p in sandbox.iterdir()) == ["canary.txt"]  # nothing left behind


# ---------------------------------------------------------------- item 5: a user's own data
def test_local_data_forms(tmp_path):
    import datasets

    rows = [{"question": f"q{i}?", "answer": f"a{i}."} for i in range(12)]
    ds = datasets.Dataset.from_list(rows)
    ds.to_json(str(tmp_path / "d.jsonl"))
    ds.to_csv(str(tmp_path / "d.csv"))
    ds.to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.jsonl", "d.csv", "d.parquet"):
        got = load_examples(Recipe(data=str(tmp_path / name), eval_size=2))
        assert sorted(r["answer"] for r in got) == sorted(r["answer"] for r in rows), name
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.cor").write_text("one\ntwo\n\nthree\n")
    (folder / "b.txt").write_text("four\nfive\n")
    (folder / ".hidden").write_bytes(b"\0\1")
    got = load_examples(Recipe(data=str(folder), eval_size=1))
    assert sorted(r["text"] for r in got) == ["five", "four", "one", "three", "two"]  # empty lines dropped
    docs = load_examples(Recipe(data=str(folder), eval_size=1, text_sample_by="document"))
    assert len(docs) == 2
    paragraphs = load_examples(Recipe(data=str(folder / "a.cor"), eval_size=1, text_sample_by="paragraph"))
    assert sorted(r["text"].strip() for r in paragraphs) == ["one\ntwo", "three"]
    (tmp_path / "blob.bin").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(RecipeError, match="not a supported data file.*jsonl"):
        load_examples(Recipe(data=str(tmp_path / "blob.bin")))
    (folder / "c.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(RecipeError, match="mixes kinds"):
        load_examples(Recipe(data=str(folder)))
    with pytest.raises(RecipeError, match="'text_field'"):
        load_examples(Recipe(data=str(folder / "a.cor"), text_field="body"))


def test_plain_text_is_packed_and_whole_documents_are_held_out():
    tok = char_tokenizer()
    recipe = Recipe(eval_size=3, seq_len=32)
    rows = [{"text": a} for a in ARTICLES[:10]]
    train, held = split(rows, recipe)
    assert not {r["text"] for r in train} & {r["text"] for r in held}
    ds = tokenize(train, tok, seq_len=32)
    targets = [t for labels in ds["labels"] for t in labels if t != -100]
    want = [t for r in train for t in tok(r["text"])["input_ids"] + [tok.eos_token_id]]
    assert targets == want  # every token of every training document, in order, once
    assert all(len(ids) == 32 for ids in ds["input_ids"])
