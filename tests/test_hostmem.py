"""The huge-page tunable for large host blocks: when it applies, and the re-run."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from jaxtrain import hostmem
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
        from jaxtrain.hostmem import reexec_with_hugepages
        print(os.getpid(), flush=True)
        reexec_with_hugepages()
        print(os.environ["GLIBC_TUNABLES"])
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    first, again, tunables = out  # the same process printed its PID before and after
    assert first == again
    assert tunables == TUNABLE
