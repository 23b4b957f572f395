"""The LLVM IR of the row-vector direct conv kernels (``numpy_direct``), as text; the
channel-vector ones are in ``numpy_channels_ir``.

Each kernel is written like C at -O0: every variable, accumulators included,
is an ``alloca`` that is loaded and stored; LLVM's passes (``numpy_llvm``
runs the O3 pipeline) promote them to registers, so the ``<8 x float>``
accumulators of a block stay in vector registers across the channel and
tap loops. Pointers are opaque (``ptr``), sizes ``i64``, arrays C-ordered,
of float (float32) or half (float16, widened as loaded, rounded once as
stored); sums are float.
"""

from __future__ import annotations

from .numpy_llvm import loop, step

VW = 8  # floats per vector
V = f"<{VW} x float>"
FMA = f"@llvm.fmuladd.v{VW}f32"


def _load(name: str, pointer: str, element: str) -> list[str]:
    """``%name``: the float vector at ``pointer`` of ``element``s (float, or half widened)."""
    if element == "float":
        return [f"  %{name} = load {V}, ptr {pointer}, align 4"]
    return [f"  %{name}.h = load <{VW} x half>, ptr {pointer}, align 2",
            f"  %{name} = fpext <{VW} x half> %{name}.h to {V}"]  # fmt: skip


def store(value: str, pointer: str, element: str, lanes: int = VW) -> list[str]:
    """Store the float vector (or scalar, ``lanes=1``) ``value`` as ``element``s (half: each
    rounded once, to nearest even)."""
    kind = f"<{lanes} x {{}}>" if lanes > 1 else "{}"
    if element == "float":
        return [f"  store {kind.format('float')} {value}, ptr {pointer}, align 4"]
    narrow = f"{value.lstrip('%')}.n"
    return [f"  %{narrow} = fptrunc {kind.format('float')} {value} to {kind.format('half')}",
            f"  store {kind.format('half')} %{narrow}, ptr {pointer}, align 2"]  # fmt: skip


def _splat(name: str, scalar: str) -> list[str]:
    """``%name``: a vector of ``scalar`` in every lane."""
    return [f"  %{name}.i = insertelement {V} poison, float {scalar}, i32 0",
            f"  %{name} = shufflevector {V} %{name}.i, {V} poison, <{VW} x i32> zeroinitializer"]  # fmt: skip


def forward(ob: int, pv: int, xt: str = "float", yt: str = "float") -> str:
    """``@kernel(x, w, y, bias, groups, cg, nblk, xcs, rowbase, rows, tapoff, taps, wout, ycs,
    yrs, hasbias)``; x: Cg channels per group, ``xcs`` elements apart, of type ``xt`` ('float'
    or 'half', widened as loaded); w: (G, nblk, Cg, taps, ob) floats; y: (G * nblk * ob, rows,
    wout) of type ``yt`` (half: rounded once from the float sum plus bias), strides (ycs,
    yrs, 1). Written like C at -O0 (every variable an ``alloca``): LLVM's passes turn them
    into registers."""
    v = V
    accs = [(o, p) for o in range(ob) for p in range(pv)]
    out = [f"declare {v} @llvm.fmuladd.v{VW}f32({v}, {v}, {v})",
           "define void @kernel(ptr noalias %x, ptr noalias %w, ptr noalias %y, ptr %bias, "
           "i64 %groups, i64 %cg, i64 %nblk, i64 %xcs, ptr %rowbase, i64 %rows, ptr %tapoff, "
           "i64 %taps, i64 %wout, i64 %ycs, i64 %yrs, i64 %hasbias) {", "entry:"]  # fmt: skip
    out += [f"  %acc{o}_{p} = alloca {v}, align 32" for o, p in accs]
    out += [f"  %tmp = alloca [{pv * VW} x float], align 32"]
    out += [f"  %{n}.a = alloca i64" for n in ("gb", "r", "xb", "c", "t", "e")]
    out += ["  %blocks = mul i64 %groups, %nblk"]

    # for gb (a block of ob output channels): x, w, y of its group
    out += ["  store i64 0, ptr %gb.a", *loop("gb", "%blocks", "exit"),
            "  %g = udiv i64 %gb, %nblk", "  %xg.0 = mul i64 %g, %cg",
            "  %xg.1 = mul i64 %xg.0, %xcs", f"  %xg = getelementptr {xt}, ptr %x, i64 %xg.1",
            "  %wg.0 = mul i64 %gb, %cg", "  %wg.1 = mul i64 %wg.0, %taps",
            f"  %wg.2 = mul i64 %wg.1, {ob}", "  %wg = getelementptr float, ptr %w, i64 %wg.2",
            f"  %o0 = mul i64 %gb, {ob}", "  %yg.0 = mul i64 %o0, %ycs",
            f"  %yg = getelementptr {yt}, ptr %y, i64 %yg.0"]  # fmt: skip
    # for r (an output row): where its taps start
    out += ["  store i64 0, ptr %r.a", *loop("r", "%rows", "gb.next"),
            "  %rb.p = getelementptr i64, ptr %rowbase, i64 %r", "  %rb = load i64, ptr %rb.p",
            f"  %xr = getelementptr {xt}, ptr %xg, i64 %rb", "  %yr.0 = mul i64 %r, %yrs",
            f"  %yr = getelementptr {yt}, ptr %yg, i64 %yr.0"]  # fmt: skip
    # for xb (pv vectors of outputs): accumulators start at the bias or zero
    out += ["  store i64 0, ptr %xb.a", *loop("xb", "%wout", "r.next"),
            "  %hb = icmp ne i64 %hasbias, 0", "  br i1 %hb, label %init.bias, label %init.zero",
            "init.bias:"]  # fmt: skip
    for o in range(ob):
        out += [f"  %bo{o} = add i64 %o0, {o}", f"  %bp{o} = getelementptr float, ptr %bias, i64 %bo{o}",
                f"  %b{o} = load float, ptr %bp{o}", *_splat(f"bs{o}", f"%b{o}")]  # fmt: skip
        out += [f"  store {v} %bs{o}, ptr %acc{o}_{p}" for p in range(pv)]
    out += ["  br label %init.done", "init.zero:"]
    out += [f"  store {v} zeroinitializer, ptr %acc{o}_{p}" for o, p in accs]
    out += ["  br label %init.done", "init.done:", f"  %xrb = getelementptr {xt}, ptr %xr, i64 %xb"]
    # for c (input channel of the group), for t (tap): ob x pv multiply-adds
    out += ["  store i64 0, ptr %c.a", *loop("c", "%cg", "sum.done"),
            "  %xc.0 = mul i64 %c, %xcs", f"  %xc = getelementptr {xt}, ptr %xrb, i64 %xc.0",
            "  %wc.0 = mul i64 %c, %taps", f"  %wc.1 = mul i64 %wc.0, {ob}",
            "  %wc = getelementptr float, ptr %wg, i64 %wc.1",
            "  store i64 0, ptr %t.a", *loop("t", "%taps", "c.next"),
            "  %to.p = getelementptr i64, ptr %tapoff, i64 %t", "  %to = load i64, ptr %to.p",
            f"  %xt = getelementptr {xt}, ptr %xc, i64 %to",
            f"  %wt.0 = mul i64 %t, {ob}", "  %wt = getelementptr float, ptr %wc, i64 %wt.0"]  # fmt: skip
    for p in range(pv):
        out += [f"  %xp{p} = getelementptr {xt}, ptr %xt, i64 {p * VW}",
                *_load(f"xv{p}", f"%xp{p}", xt)]  # fmt: skip
    for o in range(ob):
        out += [f"  %wp{o} = getelementptr float, ptr %wt, i64 {o}",
                f"  %ws{o} = load float, ptr %wp{o}", *_splat(f"wv{o}", f"%ws{o}")]  # fmt: skip
        for p in range(pv):
            out += [f"  %a{o}_{p} = load {v}, ptr %acc{o}_{p}",
                    f"  %s{o}_{p} = call {v} @llvm.fmuladd.v{VW}f32({v} %xv{p}, {v} %wv{o}, "
                    f"{v} %a{o}_{p})", f"  store {v} %s{o}_{p}, ptr %acc{o}_{p}"]  # fmt: skip
    out += [*step("t"), "c.next:", *step("c")]
    # store: whole vectors, or the valid lanes of a row's last block through %tmp
    out += ["sum.done:", f"  %yb = getelementptr {yt}, ptr %yr, i64 %xb",
            f"  %xe = add i64 %xb, {pv * VW}", "  %full = icmp sle i64 %xe, %wout",
            "  br i1 %full, label %st.full, label %st.part", "st.full:"]  # fmt: skip
    for o in range(ob):
        out += [
            f"  %yo{o} = mul i64 %ycs, {o}",
            f"  %yp{o} = getelementptr {yt}, ptr %yb, i64 %yo{o}",
        ]
        for p in range(pv):
            out += [f"  %f{o}_{p} = load {v}, ptr %acc{o}_{p}",
                    f"  %fp{o}_{p} = getelementptr {yt}, ptr %yp{o}, i64 {p * VW}",
                    *store(f"%f{o}_{p}", f"%fp{o}_{p}", yt)]  # fmt: skip
    out += ["  br label %xb.next", "st.part:", "  %rem = sub i64 %wout, %xb"]
    for o in range(ob):
        for p in range(pv):
            out += [f"  %q{o}_{p} = load {v}, ptr %acc{o}_{p}",
                    f"  %qp{o}_{p} = getelementptr float, ptr %tmp, i64 {p * VW}",
                    f"  store {v} %q{o}_{p}, ptr %qp{o}_{p}, align 4"]  # fmt: skip
        e = f"e{o}"
        out += [f"  %qy{o}.0 = mul i64 %ycs, {o}", f"  %qy{o} = getelementptr {yt}, ptr %yb, i64 %qy{o}.0",
                "  store i64 0, ptr %e.a", f"  br label %{e}.head", f"{e}.head:",
                f"  %{e} = load i64, ptr %e.a", f"  %{e}.go = icmp slt i64 %{e}, %rem",
                f"  br i1 %{e}.go, label %{e}.body, label %{e}.done", f"{e}.body:",
                f"  %{e}.s = getelementptr float, ptr %tmp, i64 %{e}", f"  %{e}.v = load float, ptr %{e}.s",
                f"  %{e}.d = getelementptr {yt}, ptr %qy{o}, i64 %{e}",
                *store(f"%{e}.v", f"%{e}.d", yt, lanes=1),
                f"  %{e}.n = add i64 %{e}, 1", f"  store i64 %{e}.n, ptr %e.a", f"  br label %{e}.head",
                f"{e}.done:"]  # fmt: skip
    out += ["  br label %xb.next", "xb.next:", "  store i64 %xe, ptr %xb.a", "  br label %xb.head",
            "r.next:", *step("r"), "gb.next:", *step("gb"), "exit:", "  ret void", "}"]  # fmt: skip
    return "\n".join(out)


def filter_grad(ob: int, cb: int, xt: str = "float", dyt: str = "float") -> str:
    """``@kernel(x, dy, dw, groups, cg, og, xcs, rowbase, rows, tapoff, taps, wout, dycs)``:
    dw[o, c, t] += sum over rows r and outputs q < wout of dy[o, r, q] * x[c, rowbase[r] +
    tapoff[t] + q], for each group's (og, cg) block; x as in :func:`forward`; dy: (G * og,
    rows, wout), channels ``dycs`` floats apart; dw: (G * og, cg, taps). Blocks of ``ob``
    output and ``cb`` input channels: ob * cb vector sums per tap, ob + cb loads per step.
    A row's last, partial vector loads only its valid lanes (masked loads: zeros elsewhere,
    nothing read past them). x and dy hold ``xt`` and ``dyt`` elements ('float' or 'half',
    widened as loaded)."""
    accs = [(o, c) for o in range(ob) for c in range(cb)]
    mloads = {t: f"@llvm.masked.load.v{VW}{'f32' if t == 'float' else 'f16'}.p0" for t in (xt, dyt)}
    out = [f"declare {V} {FMA}({V}, {V}, {V})",
           *(f"declare <{VW} x {t}> {m}(ptr, i32, <{VW} x i1>, <{VW} x {t}>)" for t, m in mloads.items()),
           f"declare float @llvm.vector.reduce.fadd.v{VW}f32(float, {V})",
           "define void @kernel(ptr noalias %x, ptr noalias %dy, ptr noalias %dw, i64 %groups, "
           "i64 %cg, i64 %og, i64 %xcs, ptr %rowbase, i64 %rows, ptr %tapoff, i64 %taps, "
           "i64 %wout, i64 %dycs) {", "entry:"]  # fmt: skip
    out += [f"  %acc{o}_{c} = alloca {V}, align 32" for o, c in accs]
    out += [f"  %{n}.a = alloca i64" for n in ("g", "ob", "cb", "t", "r", "xb")]
    lanes = ", ".join(f"i64 {i}" for i in range(VW))
    out += ["  %rem = srem i64 %wout, " + str(VW), "  %full = sub i64 %wout, %rem",
            f"  %rem.s = insertelement <{VW} x i64> poison, i64 %rem, i32 0",
            f"  %rem.v = shufflevector <{VW} x i64> %rem.s, <{VW} x i64> poison, <{VW} x i32> zeroinitializer",
            f"  %mask = icmp slt <{VW} x i64> <{lanes}>, %rem.v",
            f"  %oblocks = sdiv i64 %og, {ob}", f"  %cblocks = sdiv i64 %cg, {cb}"]  # fmt: skip
    out += ["  store i64 0, ptr %g.a", *loop("g", "%groups", "exit"),
            "  store i64 0, ptr %ob.a", *loop("ob", "%oblocks", "g.next"),
            f"  %o0.0 = mul i64 %ob, {ob}", "  %o0.1 = mul i64 %g, %og", "  %o0 = add i64 %o0.1, %o0.0",
            "  store i64 0, ptr %cb.a", *loop("cb", "%cblocks", "ob.next"),
            f"  %c0.0 = mul i64 %cb, {cb}", "  %c0.1 = mul i64 %g, %cg", "  %c0 = add i64 %c0.1, %c0.0",
            "  %xg.0 = mul i64 %c0, %xcs", f"  %xg = getelementptr {xt}, ptr %x, i64 %xg.0",
            "  %dyg.0 = mul i64 %o0, %dycs", f"  %dyg = getelementptr {dyt}, ptr %dy, i64 %dyg.0",
            "  store i64 0, ptr %t.a", *loop("t", "%taps", "cb.next"),
            "  %to.p = getelementptr i64, ptr %tapoff, i64 %t", "  %to = load i64, ptr %to.p",
            f"  %xt = getelementptr {xt}, ptr %xg, i64 %to"]  # fmt: skip
    out += [f"  store {V} zeroinitializer, ptr %acc{o}_{c}" for o, c in accs]
    out += ["  store i64 0, ptr %r.a", *loop("r", "%rows", "sums"),
            "  %rb.p = getelementptr i64, ptr %rowbase, i64 %r", "  %rb = load i64, ptr %rb.p",
            f"  %xr = getelementptr {xt}, ptr %xt, i64 %rb", "  %dyr.0 = mul i64 %r, %wout",
            f"  %dyr = getelementptr {dyt}, ptr %dyg, i64 %dyr.0",
            "  store i64 0, ptr %xb.a", *loop("xb", "%full", "tail")]  # fmt: skip

    def step_body(tag, load):
        lines = []
        for o in range(ob):
            lines += [f"  %{tag}do{o}.0 = mul i64 %dycs, {o}",
                      f"  %{tag}do{o}.1 = getelementptr {dyt}, ptr %dyr, i64 %{tag}do{o}.0",
                      f"  %{tag}do{o}.2 = getelementptr {dyt}, ptr %{tag}do{o}.1, i64 %{tag}at",
                      *load(f"{tag}dv{o}", f"%{tag}do{o}.2", dyt)]  # fmt: skip
        for c in range(cb):
            lines += [f"  %{tag}xo{c}.0 = mul i64 %xcs, {c}",
                      f"  %{tag}xo{c}.1 = getelementptr {xt}, ptr %xr, i64 %{tag}xo{c}.0",
                      f"  %{tag}xo{c}.2 = getelementptr {xt}, ptr %{tag}xo{c}.1, i64 %{tag}at",
                      *load(f"{tag}xv{c}", f"%{tag}xo{c}.2", xt)]  # fmt: skip
        for o, c in accs:
            lines += [f"  %{tag}a{o}_{c} = load {V}, ptr %acc{o}_{c}",
                      f"  %{tag}s{o}_{c} = call {V} {FMA}({V} %{tag}dv{o}, {V} %{tag}xv{c}, "
                      f"{V} %{tag}a{o}_{c})", f"  store {V} %{tag}s{o}_{c}, ptr %acc{o}_{c}"]  # fmt: skip
        return lines

    def masked(name, pointer, element):
        if element == "float":
            return [f"  %{name} = call {V} {mloads[element]}(ptr {pointer}, i32 4, "
                    f"<{VW} x i1> %mask, {V} zeroinitializer)"]  # fmt: skip
        return [f"  %{name}.h = call <{VW} x half> {mloads[element]}(ptr {pointer}, i32 2, "
                f"<{VW} x i1> %mask, <{VW} x half> zeroinitializer)",
                f"  %{name} = fpext <{VW} x half> %{name}.h to {V}"]  # fmt: skip

    out += ["  %fat = add i64 %xb, 0", *step_body("f", _load), *step("xb", str(VW))]
    out += ["tail:", "  %has.tail = icmp sgt i64 %rem, 0",
            "  br i1 %has.tail, label %tail.do, label %r.next", "tail.do:",
            "  %pat = add i64 %full, 0", *step_body("p", masked), "  br label %r.next",
            "r.next:", *step("r")]  # fmt: skip
    # the sums of the tap, into dw[o, c, t] (dw: (G * og, cg, taps))
    out += ["sums:"]
    for o, c in accs:
        out += [f"  %h{o}_{c}.v = load {V}, ptr %acc{o}_{c}",
                f"  %h{o}_{c} = call float @llvm.vector.reduce.fadd.v{VW}f32(float 0.0, {V} %h{o}_{c}.v)",
                f"  %d{o}_{c}.0 = add i64 %o0, {o}", f"  %d{o}_{c}.1 = mul i64 %d{o}_{c}.0, %cg",
                f"  %d{o}_{c}.2 = add i64 %c0.0, {c}", f"  %d{o}_{c}.3 = add i64 %d{o}_{c}.1, %d{o}_{c}.2",
                f"  %d{o}_{c}.4 = mul i64 %d{o}_{c}.3, %taps", f"  %d{o}_{c}.5 = add i64 %d{o}_{c}.4, %t",
                f"  %d{o}_{c}.p = getelementptr float, ptr %dw, i64 %d{o}_{c}.5",
                f"  %d{o}_{c}.old = load float, ptr %d{o}_{c}.p",
                f"  %d{o}_{c}.new = fadd float %d{o}_{c}.old, %h{o}_{c}",
                f"  store float %d{o}_{c}.new, ptr %d{o}_{c}.p"]  # fmt: skip
    out += [*step("t"), "cb.next:", *step("cb"), "ob.next:", *step("ob"), "g.next:",
            *step("g"), "exit:", "  ret void", "}"]  # fmt: skip
    return "\n".join(out)
