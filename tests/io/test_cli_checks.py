"""`controlnet convert | init | transfer`: bad arguments refused before any weights are read, a phase bar on a
terminal, format names with their article."""

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
import torch
from safetensors.torch import save_file

from controlnet.cli import main

GARBAGE = b"not weights at all " * 64


@pytest.fixture
def garbage(tmp_path):
    """Weights files that fail as soon as they are read (the proof that an error came before reading)."""
    paths = {}
    for name in ("x.pth", "base.safetensors", "community.safetensors", "control.safetensors"):
        paths[name.split(".")[0]] = tmp_path / name
        paths[name.split(".")[0]].write_bytes(GARBAGE)
    return paths


def refused(capsys, argv) -> str:
    """The one error line of a refusal; that it names the argument, not the garbage file's unreadability, is the proof
    it came before reading (no wall-clock bound: a loaded CI machine made one flaky at 2.2 s)."""
    rc = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    return err[0]


def test_garbage_fails_when_read(garbage, tmp_path, capsys):
    """The premise: reading these files is an error of its own (so the errors below came before reading)."""
    assert main(["convert", str(garbage["x"]), str(tmp_path / "out"), "--to", "diffusers"]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["convert", "{x}", "{tmp}/out.safetensors", "--to", "diffusers"],
            "out.safetensors: --to diffusers writes a folder, but the name ends in .safetensors",
        ),
        (
            ["convert", "{x}", "{tmp}/out", "--to", "original"],
            "out: --to original writes one file; expected a name ending in .safetensors (or .pth), got no suffix",
        ),
        (
            ["convert", "{x}", "{tmp}/out", "--to", "diffusers", "--prefix", ""],
            "--prefix '' applies to --to original only",
        ),
        (
            ["convert", "{x}", "{tmp}/out", "--to", "diffusers", "--config", "{tmp}/none.json"],
            "UNet config not found: ",
        ),
        (["convert", "{tmp}/missing.pth", "{tmp}/out", "--to", "diffusers"], "ControlNet not found: "),
        (["init", "{base}", "{tmp}/new.pth"], "--to diffusers writes a folder"),
        (["init", "{base}", "{tmp}/new", "--cond-channels", "0"], "--cond-channels 0: expected"),
        (["init", "{tmp}/nobase.safetensors", "{tmp}/new"], "base model not found: "),
        (
            ["transfer", "{control}", "{base}", "{tmp}/nope", "{tmp}/moved"],
            "community model not found: ",
        ),
        (
            [
                "transfer",
                "{control}",
                "{base}",
                "{community}",
                "{tmp}/moved.safetensors",
            ],
            "--to diffusers writes a folder",
        ),
    ],
    ids=[
        "suffix-vs-diffusers",
        "folder-vs-original",
        "prefix-diffusers",
        "config-missing",
        "source-missing",
        "init-suffix",
        "init-channels",
        "init-base-missing",
        "transfer-missing",
        "transfer-suffix",
    ],
)
def test_bad_arguments_are_refused_before_reading(garbage, tmp_path, capsys, argv, message):
    names = {k: str(v) for k, v in garbage.items()}
    argv = [a.format(tmp=tmp_path, **names) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert message in refused(capsys, argv)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_existing_destination_is_refused_first(garbage, tmp_path, capsys):
    taken = tmp_path / "taken.safetensors"
    taken.write_text("keep me")
    assert "already exists" in refused(capsys, ["convert", str(garbage["x"]), str(taken), "--to", "original"])
    assert taken.read_text() == "keep me"


def test_a_whole_sd_file_is_named_with_its_article(tmp_path, capsys):
    sd = tmp_path / "v1-5.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(sd))
    assert main(["convert", str(sd), str(tmp_path / "out"), "--to", "diffusers"]) == 2
    err = capsys.readouterr().err
    assert "holds an original-SD checkpoint" in err and "not a ControlNet" in err and " a original" not in err


def run_on_terminal(*args) -> tuple[int, str, str]:
    """Run the CLI with stderr on a pseudo-terminal (as a user sees it); returns (rc, stdout, terminal text)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # 120 columns (a new pty has 0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "controlnet.cli", *map(str, args)], stdout=subprocess.PIPE, stderr=follower
    )
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    out = proc.stdout.read().decode()
    rc = proc.wait(timeout=300)
    os.close(leader)
    return rc, out, b"".join(chunks).decode(errors="replace")


@pytest.mark.slow  # the default suite's 15-minute budget (measured 44-135 s on a loaded run); -m slow
def test_convert_and_init_show_their_phases_on_a_terminal(combined, tmp_path):
    weights, config = combined
    rc, out, term = run_on_terminal("convert", weights, tmp_path / "cn", "--to", "diffusers", "--config", config)
    assert rc == 0 and "wrote diffusers ControlNet" in out, term
    for phase in ("convert: 0/2, reading combined.safetensors", "1/2, writing diffusers cn", "2/2, done"):
        assert phase in term, term
    rc, out, term = run_on_terminal("init", weights, tmp_path / "new", "--config", config)
    assert rc == 0, term
    for phase in ("init: 0/3, reading the UNet of combined.safetensors", "1/3, copying its encoder", "3/3, done"):
        assert phase in term, term


@pytest.mark.slow  # the default suite's 15-minute budget (measured 44-135 s on a loaded run); -m slow
def test_a_failure_on_a_terminal_clears_the_bar(combined, tmp_path):
    weights, _ = combined
    rc, _, term = run_on_terminal("convert", weights, tmp_path / "cn", "--to", "diffusers")  # no --config
    assert rc == 2
    lines = [line for line in term.replace("\r", "\n").splitlines() if line.strip(" \x1b[A")]
    assert lines[-1].startswith("controlnet convert: error: cannot tell the architecture"), term
    assert "done" not in term


def test_no_bar_when_stderr_is_not_a_terminal(combined, tmp_path):
    weights, config = combined
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "controlnet.cli",
            "convert",
            str(weights),
            str(tmp_path / "cn"),
            "--to",
            "diffusers",
            "--config",
            str(config),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
