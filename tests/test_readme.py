"""Issue 22: every command in the README runs as written after the quick start. Each shell command of its fenced blocks
names a module, notebook or tool that exists, with flags its own parser accepts (fast); the "Command lines" examples and
the `load_model` example run, in order, after a stand-in for the quick start, with small flags appended (slow)."""
import importlib, importlib.util, os, re, shlex, shutil, subprocess, sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
BIN = Path(sys.executable).parent


def fenced(text):
    "`[(language, body)]` of the fenced code blocks in `text` (also those indented in a list)."
    return [(lang, re.sub(r"(?m)^" + indent, "", body)) for indent, lang, body in
            re.findall(r"(?ms)^( *)```(\w*)\n(.*?)^\1```", text)]


def shell_commands(text):
    "Every shell command of the fenced blocks of `text` (not python) as an argv: `\\` lines joined, `&&` chains split, comments and `VAR=value` prefixes dropped."
    out = []
    for lang, body in fenced(text):
        if lang == "python": continue
        for line in body.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cmd, words = (words[:words.index("&&")], words[words.index("&&") + 1:]) if "&&" in words else (words, [])
                while cmd and re.fullmatch(r"[A-Z_]+=.*", cmd[0]): cmd = cmd[1:]
                if cmd: out.append(cmd)
    return out


def lupnl_job(cmd):
    "`(module, args)` of a command that runs a lupnl module (python -m, torchrun -m), else None."
    if Path(cmd[0]).name in ("python", "python3", "torchrun") and "-m" in cmd and cmd[cmd.index("-m") + 1].startswith("lupnl"):
        i = cmd.index("-m")
        return cmd[i + 1], cmd[i + 2:]
    return None


COMMANDS = shell_commands(README.read_text())


def test_readme_commands_found():
    jobs = {lupnl_job(c)[0] for c in COMMANDS if lupnl_job(c)}
    assert {"lupnl.pretrain", "lupnl.finetune", "lupnl.evaluate", "lupnl.tracks"} <= jobs, jobs
    assert any(Path(c[0]).name == "papermill" for c in COMMANDS) and any(Path(c[0]).name == "torchrun" for c in COMMANDS)


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c)[:60])
def test_readme_command_is_valid(cmd):
    "The module exists and its parser takes the flags as written; a notebook's `-p` names are its parameters; a `.venv/bin` tool is installed."
    tool = Path(cmd[0]).name
    if cmd[0].startswith(".venv/bin/"): assert (BIN / tool).exists(), f"{tool} is not installed beside {sys.executable}"
    if (job := lupnl_job(cmd)):
        module, args = job
        assert importlib.util.find_spec(module) is not None, f"no module {module}"
        mod = importlib.import_module(module)
        if hasattr(mod, "parse_config"): mod.parse_config(args)              # pretrain, finetune: a bad flag exits 2
        elif hasattr(mod, "cli_parser"): mod.cli_parser().parse_args(args)   # evaluate
        elif "__main__" in Path(mod.__file__).read_text():                    # any other job with a command line
            res = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
            assert res.returncode == 0 and "usage" in res.stdout.lower(), res.stderr[-2000:]
    elif tool == "papermill":
        from papermill.inspection import inspect_notebook
        nb, params = REPO / cmd[1], [cmd[i + 1] for i, w in enumerate(cmd) if w in ("-p", "--parameters")]
        assert nb.is_file(), nb
        assert set(params) <= set(inspect_notebook(str(nb))), (params, sorted(inspect_notebook(str(nb))))


def test_readme_names_exist():
    "Every `lupnl.<module>.<name>` the README names exists (modules, functions, the `lupnl.load_model` shortcut)."
    import lupnl
    for name in sorted(set(re.findall(r"`[^`]*?\b(lupnl(?:\.\w+)+)", README.read_text()))):
        parts = name.split(".")
        obj, i = lupnl, 1
        while i < len(parts):
            try: obj = getattr(obj, parts[i])
            except AttributeError: obj = importlib.import_module(".".join(parts[:i + 1]))
            i += 1


SMALL = {"lupnl.pretrain": ["--epochs", "1", "--img_size", "32x16", "--eval_every", "0", "--monitor_size", "64"],
         "lupnl.finetune": ["--epochs", "1", "--id_ratio", "0.05", "--img_size", "64x32", "--eval_every", "0"],
         "lupnl.evaluate": [], "lupnl.tracks": []}


@pytest.mark.slow
def test_command_lines_run_after_the_quick_start(tmp_path, env, shared_data):
    """The "Command lines" examples, in order, each with small flags appended (later flags win: 1 epoch, small crops), in a
    folder laid out as the checkout (`../shared/data` beside it), where the quick start has written `runs/pretrain`; then
    the `load_model` example."""
    root, text = tmp_path / "lupnl", README.read_text()
    root.mkdir()
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(shared_data)
    env = {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    block = text.split("<!-- command-lines -->", 1)[1].split("<!-- /command-lines -->", 1)[0]
    jobs = [lupnl_job(c) for c in shell_commands(block)]
    assert [m for m, _ in jobs] == ["lupnl.pretrain", "lupnl.pretrain", "lupnl.finetune", "lupnl.evaluate", "lupnl.tracks"], jobs
    for k, (module, args) in enumerate(jobs):
        res = subprocess.run([sys.executable, "-m", module, *args, *SMALL[module]], cwd=root, env=env, capture_output=True,
                             text=True, timeout=900)
        assert res.returncode == 0, (module, args, res.stderr[-3000:])
        if k == 0: shutil.copytree(root / "runs" / "pnl", root / "runs" / "pretrain")   # what the quick start writes
        if module == "lupnl.evaluate": assert '"mAP"' in res.stdout                      # evaluate --json
    snippet = next(body for lang, body in fenced(text) if lang == "python" and "load_model" in body)
    res = subprocess.run([sys.executable, "-c", snippet + "\nprint(tuple(feats.shape), model.img_size)"], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.split("\n")[-2] == "(8, 512) (32, 16)", res.stderr[-3000:]
