"""Where a compiled step spends its time, op by op: JAX's profiler on our side, torch's on NVlabs'.

`bench-stylegan2 --compare-nvlabs PATH --profile` uses this to locate a speed gap: both sides are
traced for one unit of work and their ops are put into the same buckets (convolution forward,
convolution backward, matrix products, element-wise work, reductions, copies and layout changes,
the rest), so a table can say which kind of work one side spends more time on.

Our side: the XLA:CPU runtime records one profiler event per HLO thunk (`hlo_op` stat); the compiled
module's text says what each instruction is (opcode, fused computation), whether it comes from a
derivative (`transpose(jvp(...))` in its op_name), and which Python function made it (its stack
frame). NVlabs' side: `torch.profiler` self CPU time per aten op.
"""

from __future__ import annotations

import collections
import glob
import re
import tempfile
import time
from pathlib import Path

import jax
from jax.profiler import ProfileData

BUCKETS = ("conv forward", "conv backward", "matmul", "element-wise", "reduction", "copy / layout", "other")

_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([\w\-]+)\((.*)$")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_COMP = re.compile(r"^(?:ENTRY\s+)?%([\w.\-]+)\s.*\{\s*$")


def _derivative(op_name: str) -> int:
    """How many times an op was transposed (0: forward, 1: first-order backward, 2: R1's second)."""
    return op_name.count("transpose(")


class HloIndex:
    """What each instruction of a compiled module is: bucket, derivative order, Python function."""

    def __init__(self, text: str, project_roots: tuple[str, ...] = ("viscoin_jax/", "kernels/")):
        self.instr: dict[str, tuple[str, str, str, int]] = {}  # name -> (opcode, calls, op_name, frame)
        self.computations: dict[str, list[str]] = collections.defaultdict(list)  # comp -> opcodes
        self._roots = project_roots
        section, comp = None, None
        files, funcs, locs, frames = {}, {}, {}, {}
        for line in text.splitlines():
            head = line.strip()
            if not head:  # a blank line ends a stack-frame section
                section = None
                continue
            if head in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
                section = head
                continue
            if section:
                m = re.match(r"(\d+)\s+(.*)$", head)
                if not m:
                    continue
                key, rest = int(m.group(1)), m.group(2)
                if section == "FileNames":
                    files[key] = rest.strip('"')
                elif section == "FunctionNames":
                    funcs[key] = rest.strip('"')
                elif section == "FileLocations":
                    f = dict(re.findall(r"(\w+)=(\d+)", rest))
                    locs[key] = (int(f.get("file_name_id", 0)), int(f.get("function_name_id", 0)),
                                 int(f.get("line", 0)))
                else:
                    f = dict(re.findall(r"(\w+)=(\d+)", rest))
                    frames[key] = (int(f.get("file_location_id", 0)), int(f.get("parent_frame_id", 0)))
                continue
            m = _COMP.match(line)
            if m:
                comp = m.group(1)
                continue
            m = _INSTR.match(line)
            if m:
                name, opcode, rest = m.group(1), m.group(3), m.group(4)
                calls = _CALLS.search(rest)
                op_name = _OP_NAME.search(rest)
                frame = _FRAME.search(rest)
                self.instr[name] = (opcode, calls.group(1) if calls else "", op_name.group(1) if op_name else "",
                                    int(frame.group(1)) if frame else 0)
                if comp:
                    self.computations[comp].append(opcode)
        self._files, self._funcs, self._locs, self._frames = files, funcs, locs, frames

    def where(self, frame: int) -> str:
        """The innermost project function of a stack frame ("file.py:function"), else "-"."""
        seen = set()
        while frame and frame not in seen:
            seen.add(frame)
            loc_id, parent = self._frames.get(frame, (0, 0))
            file_id, func_id, _ = self._locs.get(loc_id, (0, 0, 0))
            path = self._files.get(file_id, "")
            if any(root in path for root in self._roots):
                return f"{Path(path).name}:{self._funcs.get(func_id, '?')}"
            frame = parent
        return "-"

    def bucket(self, name: str) -> tuple[str, int, str]:
        """(bucket, derivative order, where) of an instruction (unknown names: "other")."""
        base = name.split(":")[0]
        if base not in self.instr:
            return "other", 0, "-"
        opcode, calls, op_name, frame = self.instr[base]
        order = _derivative(op_name)
        inner = set(self.computations.get(calls, [])) if opcode == "fusion" else {opcode}
        if "convolution" in inner:
            kind = "conv backward" if order else "conv forward"
        elif "dot" in inner:
            where = self.where(frame)
            # the per-tap weight gradients of kernels/conv2d_resample are a convolution's backward
            kind = "conv backward" if where.startswith("conv2d_resample.py") and order else "matmul"
            return kind, order, where
        elif inner & {"reduce", "reduce-window", "select-and-scatter", "scatter"}:
            kind = "reduction"
        elif opcode in ("copy", "transpose", "bitcast", "reshape", "slice", "concatenate", "pad",
                        "dynamic-slice", "dynamic-update-slice", "gather") or (
                opcode == "fusion" and (name.startswith(("transpose", "copy", "concatenate", "slice",
                                                         "pad", "dynamic")))):
            kind = "copy / layout"
        elif opcode == "fusion" or opcode in ("add", "multiply", "subtract", "divide", "maximum",
                                              "exponential", "tanh", "select", "compare", "sqrt",
                                              "rsqrt", "convert", "negate", "power", "log"):
            kind = "element-wise"
        else:
            kind = "other"
        return kind, order, self.where(frame)


def _op_intervals(data) -> list[tuple[int, int, str]]:
    """(start_ns, end_ns, op) of every HLO op run: from its start event to its "end: <op>" event.

    XLA:CPU runs convolutions and other large ops asynchronously on its thread pool: the op's own
    event covers only the launch, and the executor records "end: <op>" when the work is done (on
    whichever thread finished it). Start and end events are paired per op name in time order.
    """
    starts: dict[str, list[int]] = collections.defaultdict(list)
    ends: dict[str, list[int]] = collections.defaultdict(list)
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                if event.name.startswith("end: "):
                    ends[event.name[5:]].append(event.start_ns + event.duration_ns)
                elif any(key == "hlo_op" for key, _ in event.stats):
                    starts[event.name].append(event.start_ns)
    out = []
    for op, begun in starts.items():
        begun.sort()
        done = sorted(ends.get(op, []))
        for i, t0 in enumerate(begun):
            if i < len(done) and done[i] >= t0:  # an op without its end event is left out, not guessed
                out.append((t0, done[i], op))
    return out


def _op_seconds(data) -> dict[str, float]:
    """Wall seconds per HLO op, shared fairly: ops in flight at the same time split that time evenly.

    Independent ops overlap on XLA:CPU's thread pool (and an op's interval includes its wait in the
    queue), so raw intervals add up to more than the run took; splitting each moment among the ops
    in flight makes the per-op seconds add up to the time any op was running.
    """
    return fair_share(_op_intervals(data))


def fair_share(intervals) -> dict[str, float]:
    """Seconds per op from (start_ns, end_ns, op) intervals, each moment split among the ops in flight."""
    boundaries = []
    for t0, t1, op in intervals:
        boundaries.append((t0, 1, op))
        boundaries.append((t1, -1, op))
    boundaries.sort(key=lambda b: (b[0], b[1]))  # at equal times, ends before starts
    per_op: dict[str, float] = collections.defaultdict(float)
    active: collections.Counter = collections.Counter()
    in_flight, last = 0, None
    for t, kind, op in boundaries:
        if in_flight and last is not None and t > last:
            share = (t - last) * 1e-9 / in_flight
            for name, count in active.items():
                per_op[name] += share * count
        active[op] += kind
        if active[op] == 0:
            del active[op]
        in_flight += kind
        last = t
    return dict(per_op)


END_EVENT_GRACE_S = 0.25


def trace_jax(run, hlo_texts: list[str]) -> tuple[dict, list[tuple]]:
    """Runs `run()` under the JAX profiler; returns ({bucket: seconds}, [(seconds, op, bucket, order,
    where), ...] sorted, largest first). `hlo_texts`: the compiled modules `run` executes."""
    index = HloIndex("\n".join(hlo_texts))
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            jax.block_until_ready(run())
            # XLA:CPU records an async op's "end:" event on its worker thread just after the result
            # is ready; stopping the trace at once can drop it (seen on a loaded machine: the
            # convolution vanished from the profile), so the trace stays open a moment longer.
            time.sleep(END_EVENT_GRACE_S)
        files = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)
        if not files:
            raise RuntimeError("the JAX profiler wrote no trace")
        data = ProfileData.from_file(files[0])
    per_op = _op_seconds(data)
    buckets: dict[str, float] = collections.defaultdict(float)
    rows = []
    for op, seconds in per_op.items():
        kind, order, where = index.bucket(op)
        buckets[kind] += seconds
        rows.append((seconds, op, kind, order, where))
    rows.sort(reverse=True)
    return dict(buckets), rows


_TORCH_BUCKETS = (
    (("convolution_backward", "conv_depthwise2d_backward", "slow_conv2d_backward",
      "mkldnn_convolution_backward"), "conv backward"),
    (("convolution", "conv2d", "mkldnn_convolution", "_convolution", "slow_conv2d",
      "conv_transpose2d", "thnn_conv2d"), "conv forward"),
    (("mm", "addmm", "bmm", "matmul", "linear", "baddbmm"), "matmul"),
    (("optimizer", "Optimizer.step#Adam.step", "Optimizer.zero_grad#Adam.zero_grad"), "other"),
    (("sum", "mean", "std", "var", "norm", "amax", "max", "min", "prod", "cumsum", "square_sum"),
     "reduction"),
    (("copy_", "contiguous", "clone", "to", "_to_copy", "cat", "stack", "pad", "constant_pad_nd",
      "index", "index_select", "slice", "narrow", "permute", "transpose", "reshape", "view", "flip",
      "expand", "repeat", "empty", "empty_like", "zeros", "zeros_like", "fill_", "zero_", "as_strided",
      "unsqueeze", "squeeze", "select", "t", "resize_", "new_empty", "new_zeros", "flatten"),
     "copy / layout"),
)


def torch_bucket(aten_name: str) -> str:
    """The bucket of an aten op (matrix products split forward / backward by the caller)."""
    name = aten_name.split("::")[-1]
    for names, bucket in _TORCH_BUCKETS:
        if name in names:
            return bucket
    if name.endswith("Backward0") or name.endswith("Backward1") or "backward" in name:
        return "autograd"
    return "element-wise"


def torch_profile(run) -> dict:
    """{bucket: seconds} of self CPU time of the aten ops `run()` executes (torch.profiler)."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run()
    buckets: dict[str, float] = collections.defaultdict(float)
    for avg in prof.key_averages():
        bucket = torch_bucket(avg.key)
        buckets["other" if bucket == "autograd" else bucket] += avg.self_cpu_time_total * 1e-6
    return dict(buckets)


def print_profile_table(ours: dict, theirs: dict, ours_total: float, theirs_total: float) -> None:
    """Both sides' seconds per bucket and our seconds over theirs."""
    keys = [b for b in BUCKETS if b in ours or b in theirs] + sorted((set(ours) | set(theirs)) - set(BUCKETS))
    header = f"{'bucket':<18} {'ours s':>8} {'NVlabs s':>9} {'ours / NVlabs':>13}"
    print(header)
    print("-" * len(header))
    for k in keys:
        a, b = ours.get(k, 0.0), theirs.get(k, 0.0)
        print(f"{k:<18} {a:>8.3f} {b:>9.3f} {(a / b if b > 0 else float('inf')):>12.2f}x")
    print(f"{'profiled total':<18} {sum(ours.values()):>8.3f} {sum(theirs.values()):>9.3f}")
    print(f"{'wall (timed)':<18} {ours_total:>8.3f} {theirs_total:>9.3f}")
