"""How large host blocks are allocated: when the huge-page tunable applies, oneTBB's
allocator preloaded, the re-run, and a bad mode's one-line error."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from jaxtrain import hostmem
from jaxtrain.errors import UserError
from jaxtrain.hostmem import TUNABLE, hugepage_env


@pytest.fixture
def linux_glibc(monkeypatch, tmp_path):
    """A Linux glibc 2.36 host whose THP mode file reads ``madvise``."""
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.36"))
    mode = tmp_path / "enabled"
    mode.write_text("always [madvise] never\n")
    return mode


def test_the_tunable_is_added_to_the_ones_given(linux_glibc):
    env = hugepage_env({"PATH": "/bin"}, linux_glibc)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": TUNABLE}
    given = {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}
    both = f"glibc.malloc.arena_max=2:{TUNABLE}"
    assert hugepage_env(given, linux_glibc)["GLIBC_TUNABLES"] == both


def test_the_tunable_is_left_out_where_it_does_not_apply(linux_glibc, monkeypatch, tmp_path):
    assert hugepage_env({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, linux_glibc) is None
    assert hugepage_env({"JAXTRAIN_HOST_MALLOC": "system"}, linux_glibc) is None
    assert hugepage_env({}, tmp_path / "missing") is None
    linux_glibc.write_text("always madvise [never]\n")
    assert hugepage_env({}, linux_glibc) is None
    linux_glibc.write_text("[always] madvise never\n")
    assert hugepage_env({}, linux_glibc) is not None
    monkeypatch.setattr(platform, "libc_ver", lambda: ("glibc", "2.31"))  # no such tunable
    assert hugepage_env({}, linux_glibc) is None
    monkeypatch.setattr(platform, "libc_ver", lambda: ("", ""))  # musl
    assert hugepage_env({}, linux_glibc) is None


def test_the_process_reruns_itself_once_with_the_tunable():
    drop = ("GLIBC_TUNABLES", "JAXTRAIN_HOST_MALLOC")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if hugepage_env(env, hostmem.THP_MODE) is None:
        pytest.skip("no glibc 2.35+ with transparent huge pages on this host")
    code = textwrap.dedent(
        """
        import os
        from jaxtrain.hostmem import reexec
        print(os.getpid(), flush=True)
        reexec()
        print(os.environ["GLIBC_TUNABLES"])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    first, again, tunables = out  # the same process printed its PID before and after
    assert first == again
    assert tunables == TUNABLE


def test_tbb_is_preloaded_keeping_large_blocks(tmp_path):
    (tmp_path / "lib").mkdir()
    for name in hostmem.TBB_LIBRARIES:
        (tmp_path / "lib" / name).write_bytes(b"")
    folders = [tmp_path / "missing", tmp_path / "lib"]
    env = hostmem.tbb_env({"LD_PRELOAD": "/opt/other.so"}, folders)
    allocator, proxy = (str(tmp_path / "lib" / name) for name in hostmem.TBB_LIBRARIES)
    assert env["LD_PRELOAD"] == f"{allocator} {proxy} /opt/other.so"  # the allocator first
    assert env["TBB_MALLOC_SET_HUGE_SIZE_THRESHOLD"] == str(64 << 20)
    assert hostmem.tbb_env(env, folders) is None  # already in effect: no second re-run
    with pytest.raises(UserError, match=r"^JAXTRAIN_HOST_MALLOC=tbb needs the tbb package"):
        hostmem.tbb_env({}, [tmp_path / "missing"])


def test_the_mode_is_checked():
    assert hostmem.mode({}) == "hugepages"
    assert hostmem.mode({"JAXTRAIN_HOST_MALLOC": " TBB "}) == "tbb"
    with pytest.raises(UserError, match="^JAXTRAIN_HOST_MALLOC='jemalloc': must be one of"):
        hostmem.mode({"JAXTRAIN_HOST_MALLOC": "jemalloc"})


def test_a_bad_mode_is_one_line_from_the_cli():
    env = {**os.environ, "JAXTRAIN_HOST_MALLOC": "jemalloc"}
    proc = subprocess.run(
        [sys.executable, "-m", "jaxtrain.cli", "train"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "jaxtrain: error: JAXTRAIN_HOST_MALLOC='jemalloc': must be one of hugepages, tbb, system"
    ]


def test_under_tbb_a_freed_large_block_is_reused_without_faults():
    """The re-run process has oneTBB's allocator in place of malloc, and a 100 MB block
    freed and asked for again comes back without the kernel faulting pages in anew (as
    glibc's fresh mmap does every time)."""
    if hostmem.tbb_libraries() is None:
        pytest.skip("the tbb package is not installed (pip install 'jaxtrain[tbb]')")
    code = textwrap.dedent(
        """
        import resource
        import numpy as np
        from jaxtrain.hostmem import reexec
        reexec()
        def faults():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            block = np.empty(100 << 20, np.uint8)
            block.fill(1)
            del block
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
        print("libtbbmalloc_proxy" in open("/proc/self/maps").read(), faults(),
              max(faults() for _ in range(3)))
        """
    )
    env = {**os.environ, "JAXTRAIN_HOST_MALLOC": "tbb"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    preloaded, first, again = out[0], int(out[1]), int(out[2])
    assert preloaded == "True"
    assert first > 0 and again <= first // 10, (first, again)
