"""Build ids on mappings and the inlined marker on frames, against published vectors and the toolchain.

Known answers: the OpenTelemetry eBPF profiler's published test vectors for its file id
(htlhash) and kernel file id, ``go tool buildid`` for the Go build id, ``readelf -n`` for GNU
build ids, ``/proc/kallsyms`` for the kernel's text, and ``runtime.CallersFrames`` for
inlined Go calls.
"""

from __future__ import annotations

import io
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from elftools.elf.elffile import ELFFile

from agent.symbols.file_ids import (
    fnv128a,
    gnu_build_id_from_notes,
    go_build_id,
    htlhash,
    htlhash_of_path,
    kernel_build_id,
    kernel_htlhash,
)
from agent.symbols.symbolizer import Symbolizer
from integration.go_toolchains import system
from shared.model import KERNEL_FILENAME, FrameType
from tests.conftest import GoBuilds

INLINE_SOURCE = Path(__file__).resolve().parent / "fixtures" / "go_inline"


def test_htlhash_and_kernel_file_id_match_the_published_vectors() -> None:
    # libpf/fileid_test.go of the OpenTelemetry eBPF profiler
    assert htlhash(io.BytesIO(bytes([0x7F, 0x45, 0x4C, 0x46, 0x00, 0x01, 0x2, 0x3, 0x4]))) == \
        "caf6e5907166ac76eef618e5f7f59cd9"
    assert kernel_htlhash("f8e1cf0f60558098edaec164ac7749df") == "026a2d6a60ee6b4eb8ec85adf2e76f4d"
    assert kernel_htlhash("abcd") == ""  # under 16 bytes of build id: no id
    assert fnv128a(b"").hex() == "6c62272e07bb014262b821756295c58d"  # FNV-128a offset basis


def test_htlhash_covers_head_tail_and_length(tmp_path: Path) -> None:
    a = bytes(range(256)) * 64  # 16 KiB
    b = a[:8000] + b"x" + a[8001:]  # changed in the middle, outside both 4 KiB ends
    c = a[:100] + b"x" + a[101:]
    hashes = [htlhash(io.BytesIO(x)) for x in (a, b, c, a + b"\0")]
    assert hashes[0] == hashes[1] and len({hashes[0], hashes[2], hashes[3]}) == 3
    (tmp_path / "f").write_bytes(a)
    assert htlhash_of_path(str(tmp_path / "f")) == hashes[0]
    assert htlhash_of_path(str(tmp_path / "missing")) == ""


def test_kernel_build_id_is_the_one_in_sys_kernel_notes() -> None:
    text = subprocess.run(["readelf", "-n", "/sys/kernel/notes"], capture_output=True, text=True).stdout
    truth = re.search(r"Build ID: ([0-9a-f]+)", text)
    if truth is None:  # readelf cannot read the raw notes file: decode its GNU note by hand
        with open("/sys/kernel/notes", "rb") as f:
            assert kernel_build_id() == gnu_build_id_from_notes(f.read()) != ""
    else:
        assert kernel_build_id() == truth.group(1)


def test_kernel_frames_are_offsets_into_the_kernel_text_with_its_build_id() -> None:
    symbols = {}
    with open("/proc/kallsyms") as f:
        for line in f:
            addr, kind, name = line.split()[:3]
            if name in ("_stext", "_etext", "schedule") and kind in "tT":
                symbols[name] = int(addr, 16)
    (frame,) = Symbolizer().symbolize_kernel([symbols["schedule"] + 4])
    assert frame.function == "schedule" and frame.frame_type == FrameType.KERNEL
    assert frame.address == symbols["schedule"] + 4 - symbols["_stext"]
    m = frame.mapping
    assert m is not None and m.filename == KERNEL_FILENAME
    assert (m.start, m.limit, m.offset) == (0, symbols["_etext"] - symbols["_stext"], 0)
    assert m.build_id == kernel_build_id() != "" and m.htlhash == kernel_htlhash(m.build_id)


@pytest.fixture(scope="module")
def waiting_go(go_builds: GoBuilds) -> Iterator[tuple[subprocess.Popen[str], Path, str]]:
    """The go_inline fixture program, kept alive ("wait") after printing its own stack."""
    binary = go_builds.get(INLINE_SOURCE, system(), "plain")
    proc = subprocess.Popen([str(binary), "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        if line.strip() == "ready":
            break
        lines.append(line)
    yield proc, binary, "".join(lines)
    proc.kill()
    proc.wait()


def test_go_inlined_calls_are_marked_and_the_mapping_has_every_build_id(
        waiting_go: tuple[subprocess.Popen[str], Path, str]) -> None:
    proc, binary, text = waiting_go
    pc = int(re.search(r"^pc (\d+)$", text, re.M).group(1))  # type: ignore[union-attr]
    truth = [m.group(1) for m in re.finditer(r"^frame (\S+) \S+ \d+$", text, re.M)]
    physical = truth.index("main.outer") + 1
    # pc as a return address (not the leaf): the symbolizer looks up its call site
    frames = Symbolizer().symbolize_user(proc.pid, [pc, pc])
    first_group_end = next(i for i, f in enumerate(frames) if not f.inlined) + 1
    caller = list(frames[first_group_end:])
    assert [f.function for f in caller] == truth[:physical] == ["main.leaf", "main.middle", "main.outer"]
    assert [f.inlined for f in caller] == [True, True, False]
    m = caller[0].mapping
    assert m is not None and m.filename == str(binary)
    buildid = system().tool("buildid", str(binary)).strip()
    assert m.go_build_id == buildid
    with open(binary, "rb") as f:
        assert go_build_id(ELFFile(f)) == buildid
    assert m.htlhash == htlhash_of_path(str(binary)) != ""
