"""Phase lines: the stretches of work a user waits for that are not counted steps.

Loading a ControlNet, packing weights for the CPU, caching latents, decoding and saving images, writing a
checkpoint or an export each take seconds at Stable Diffusion size. The library names each such stretch with
`phase(name)` and logs it (only the CLI prints: docs/style.md#errors-for-users-asserts-for-invariants); the CLI
shows the lines (`show_phases`): one line per phase on stderr when stderr is a terminal or with `-v`, and with `-v`
a second line when the phase ends, with its time and the process's resident memory. Without a terminal and
without `-v` nothing is printed, so a log read by a program keeps its one error line.

Step loops have bars of their own (the CLI's); a phase is what happens between them. Standard library only, so
that any part may name its phases.
"""

from __future__ import annotations

import contextlib
import logging
import re
import sys
import time
from collections.abc import Iterator

LOGGER_NAME = "controlnet.phase"
logger = logging.getLogger(LOGGER_NAME)

START, END = "start", "end"  # the `phase_event` of a record


@contextlib.contextmanager
def phase(name: str) -> Iterator[None]:
    """Work named `name` runs inside the block: a start record, then (also after an error) an end record with the
    seconds it took (`phase_seconds`)."""
    logger.info("%s", name, extra={"phase_event": START, "phase_name": name})
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - started
        logger.debug(
            "%s: %.1f s",
            name,
            seconds,
            extra={"phase_event": END, "phase_name": name, "phase_seconds": seconds},
        )


def resident_gb() -> tuple[float, float] | None:
    """(resident set, its peak so far) of this process in GB (Linux /proc/self/status), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            status = f.read()
    except OSError:
        return None
    now, peak = re.search(r"VmRSS:\s+(\d+) kB", status), re.search(r"VmHWM:\s+(\d+) kB", status)
    if now is None or peak is None:
        return None
    return int(now[1]) / 2**20, int(peak[1]) / 2**20


class PhaseLines(logging.Handler):
    """Renders phase records on stderr: the phase's name as it starts; with `verbose`, its time and memory as it
    ends. Written through tqdm when it is loaded, so that a bar on the terminal is redrawn below the line."""

    def __init__(self, verbose: bool, stream=None):
        super().__init__(logging.DEBUG)
        self.verbose, self.stream = verbose, stream

    def emit(self, record: logging.LogRecord) -> None:
        event = getattr(record, "phase_event", None)
        if event == START:
            line = f"{record.phase_name} ..."
        elif event == END and self.verbose:
            memory = resident_gb()
            extra = f", resident {memory[0]:.2f} GB (peak {memory[1]:.2f} GB)" if memory else ""
            line = f"  {record.phase_name}: done in {record.phase_seconds:.1f} s{extra}"
        else:
            return
        stream = self.stream or sys.stderr
        tqdm = sys.modules.get("tqdm")
        if tqdm is not None:
            tqdm.tqdm.write(line, file=stream)
        else:
            print(line, file=stream, flush=True)


def show_phases(verbose: bool, stream=None) -> bool:
    """Print phase lines on `stream` (stderr) from now on, if it is a terminal or `verbose`; returns whether they
    are shown. For the CLI: the library only logs them."""
    for handler in list(logger.handlers):  # a second call (tests run cli.main repeatedly) starts afresh
        if isinstance(handler, PhaseLines):
            logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    target = stream or sys.stderr
    if not (verbose or (hasattr(target, "isatty") and target.isatty())):
        return False
    logger.addHandler(PhaseLines(verbose, stream))
    logger.setLevel(logging.DEBUG)
    logger.propagate = False  # -v's root handler would print the records a second time
    return True
