"""Every Triton kernel the backbone launches compiles for a GPU (sm_90), checked on a machine without one.

The checks run in subprocesses without TRITON_INTERPRET: the root conftest sets it for this
process, and Triton reads it when the kernels are decorated.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KERNELS = {
    "_shrink_kernel", "_sum_splits_kernel", "_expand_kernel", "_rms_norm_kernel", "_rotary_kernel", "_write_kv_kernel",
    "_decode_kernel", "_decode_reduce_kernel", "_prefill_kernel", "_silu_mul_kernel", "_race_sample_kernel",
    "_gate_up_kernel", "_down_kernel",
}


def _run(args: list[str], interpret: bool = False, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-W", "ignore", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_every_kernel_compiles_for_sm90_at_real_model_shapes(tmp_path):
    out = tmp_path / "sm90.json"
    proc = _run(["-m", "server.cli", "compile-check", "--arch", "90", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    records = report["records"]
    assert {r["kernel"] for r in records} == KERNELS
    assert all(r["problems"] == [] for r in records)
    assert all(0 < r["registers"] <= 255 and r["shared"] <= 232448 for r in records)
    # bf16 and fp16, decode and prefill tiles, GQA groups 4 and 7, head_dim 16..128 all specialise
    constants = {r["constants"] for r in records}
    assert any("GROUP=7" in c for c in constants) and any("BLOCK_D=64" in c for c in constants)
    assert {"BLOCK_M=16", "BLOCK_M=64"} <= {p for c in constants for p in c.split()}
    assert "specialisations compiled" in proc.stdout


def test_a_model_directory_is_checked_from_its_config(tiny_checkpoints):
    proc = _run(["-m", "server.cli", "compile-check", "--config", tiny_checkpoints("qwen3"), "--dtype", "float16"])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "_rms_norm_kernel" in proc.stdout and "0 cases failed to compile" in proc.stdout


def test_bad_invocations_get_a_clear_error(tmp_path):
    proc = _run(["-m", "server.cli", "compile-check", "--config", str(tmp_path / "missing")])
    assert proc.returncode == 2 and "--config" in proc.stderr and "missing" in proc.stderr
    proc = _run(["-m", "server.cli", "compile-check", "--model", "tiny"], interpret=True)
    assert proc.returncode == 2 and "TRITON_INTERPRET is set" in proc.stderr
    proc = _run(["-m", "server.cli", "compile-check", "--model", "tiny", "--config", str(tmp_path)])
    assert proc.returncode == 2 and "not both" in proc.stderr


PROBE = textwrap.dedent('''
    import json, sys
    import torch, triton, triton.language as tl
    from server.model.compile_check import compile_all

    @triton.jit
    def copy(x, o, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(o + offs, tl.load(x + offs, mask=offs < n), mask=offs < n)

    @triton.jit
    def matmul(a, b, c, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        rm, rn, rk = tl.arange(0, BM), tl.arange(0, BN), tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(0, K, BK):
            acc += tl.dot(tl.load(a + rm[:, None] * K + (k + rk)[None, :]),
                          tl.load(b + (k + rk)[:, None] * BN + rn[None, :]))
        tl.store(c + rm[:, None] * BN + rn[None, :], acc)

    @triton.jit
    def softmax_rows(x, o, BM: tl.constexpr, BN: tl.constexpr):
        offs = tl.arange(0, BM)[:, None] * BN + tl.arange(0, BN)[None, :]
        v = tl.exp(tl.load(x + offs).to(tl.float32))
        tl.store(o + offs, v / tl.sum(v, 1)[:, None])

    x = torch.randn(4096, dtype=torch.float16)
    records, failures = compile_all(80, [
        ("copy", lambda: copy[(1,)](x, x, 100, BLOCK=128)),
        ("dot with K=8", lambda: matmul[(1,)](x, x, x, 64, BM=16, BN=16, BK=8)),
        ("huge tiles", lambda: matmul[(1,)](x, x, x, 4096, BM=256, BN=256, BK=128, num_stages=4)),
        ("one warp, 16K values", lambda: softmax_rows[(1,)](x, x, BM=64, BN=256, num_warps=1)),
    ])
    print(json.dumps({"records": {r.constants: r.__dict__ for r in records},
                      "failures": [f.__dict__ for f in failures]}))
''')


def test_compile_errors_resource_limits_and_spills_are_reported(tmp_path):
    """The check can fail: a dot tile the GPU rejects, shared memory over sm_80's limit, spilled registers."""
    script = tmp_path / "probe.py"
    script.write_text(PROBE)
    proc = _run([str(script)])
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    records = report["records"]
    assert records["BLOCK=128"]["problems"] == [] and records["BLOCK=128"]["spilled"] == 0
    assert [f["case"] for f in report["failures"]] == ["dot with K=8"]
    assert "K >= 16" in report["failures"][0]["error"]
    huge = records["BM=256 BN=256 BK=128"]
    assert huge["shared"] > 166912 and huge["problems"] == [f"shared memory {huge['shared']} B > 166912 B per block"]
    assert records["BM=64 BN=256"]["spilled"] > 0 and records["BM=64 BN=256"]["registers"] == 255
