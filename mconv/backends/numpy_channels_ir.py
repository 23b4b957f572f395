"""The LLVM IR of the channel-vector direct conv kernels (``numpy_channels``), as text,
written as ``numpy_direct_ir``'s are (C at -O0: LLVM's passes promote the ``alloca``s).

A vector holds ``lanes`` output channels (16 with AVX-512, else 8); a block is ``nv``
vectors by ``pix`` output positions (forward) or by ``rb`` (input channel, tap) pairs (the
weight gradient), one accumulator each; the other operand is broadcast, one value at a
time. Weights and dy are read in the layout :func:`pack` makes; the input planes are
float32 (``numpy_channels`` widens float16 as it pads them).
"""

from __future__ import annotations

from .numpy_direct_ir import store
from .numpy_llvm import loop, step


def _broadcast_fmas(vectors: list[str], bases: list[str], offset: str, lanes: int) -> list[str]:
    """IR lines: for each i, the float at ``bases[i] + offset`` broadcast to all lanes and
    multiplied by each of ``vectors`` (k), added into the accumulator ``%acc{k}_{i}``."""
    v, out = f"<{lanes} x float>", []
    for i, base in enumerate(bases):
        out += [f"  %xp{i} = getelementptr float, ptr {base}, i64 {offset}",
                f"  %xs{i} = load float, ptr %xp{i}",
                f"  %xi{i} = insertelement {v} poison, float %xs{i}, i32 0",
                f"  %xv{i} = shufflevector {v} %xi{i}, {v} poison, <{lanes} x i32> zeroinitializer"]  # fmt: skip
        for k, vector in enumerate(vectors):
            out += [f"  %a{k}_{i} = load {v}, ptr %acc{k}_{i}",
                    f"  %s{k}_{i} = call {v} @llvm.fmuladd.v{lanes}f32({v} {vector}, {v} %xv{i}, "
                    f"{v} %a{k}_{i})", f"  store {v} %s{k}_{i}, ptr %acc{k}_{i}"]  # fmt: skip
    return out


def forward(nv: int, pix: int, lanes: int, yt: str = "float") -> str:
    """``@kernel(x, w, y, bias, groups, cg, nblk, og, xcs, pixbase, pixout, npix, tapoff, taps,
    ycs, hasbias)``: vectors along the output channels. A block is ``ob = nv * lanes`` output
    channels of a group by ``pix`` output positions; position p reads its taps at
    ``pixbase[p] + tapoff[t]`` of each input channel (floats, ``xcs`` apart), so a block
    may span rows. Per (channel, tap): ``nv`` weight vectors loaded, ``pix``
    input values broadcast, ``nv * pix`` multiply-adds. w: (G, nblk, Cg, taps, ob) floats,
    the output channels zero-padded to nblk * ob per group; bias: (G, nblk * ob) floats;
    y: G * og channels of type ``yt``, ``ycs`` elements apart, position p at ``pixout[p]``
    in each (any strided view). The last block's positions past ``npix`` repeat the last one
    and are not stored; nor are the padded channels."""
    v, fma, ob = f"<{lanes} x float>", f"@llvm.fmuladd.v{lanes}f32", nv * lanes
    accs = [(k, p) for k in range(nv) for p in range(pix)]
    out = [f"declare {v} {fma}({v}, {v}, {v})",
           "define void @kernel(ptr noalias %x, ptr noalias %w, ptr noalias %y, ptr %bias, "
           "i64 %groups, i64 %cg, i64 %nblk, i64 %og, i64 %xcs, ptr %pixbase, ptr %pixout, "
           "i64 %npix, ptr %tapoff, i64 %taps, i64 %ycs, i64 %hasbias) {", "entry:"]  # fmt: skip
    out += [f"  %acc{k}_{p} = alloca {v}, align 64" for k, p in accs]
    out += [f"  %tmp = alloca [{pix * ob} x float], align 64"]
    out += [f"  %{n}.a = alloca i64" for n in ("g", "blk", "p0", "c", "t", "o", "q")]
    out += ["  %last = sub i64 %npix, 1", "  %hb = icmp ne i64 %hasbias, 0"]
    # for g (a group): its x, w, y and bias
    out += ["  store i64 0, ptr %g.a", *loop("g", "%groups", "exit"),
            "  %xg.0 = mul i64 %g, %cg", "  %xg.1 = mul i64 %xg.0, %xcs",
            "  %xg = getelementptr float, ptr %x, i64 %xg.1", "  %wg.0 = mul i64 %g, %nblk",
            "  %wg.1 = mul i64 %wg.0, %cg", "  %wg.2 = mul i64 %wg.1, %taps",
            f"  %wg.3 = mul i64 %wg.2, {ob}", "  %wg = getelementptr float, ptr %w, i64 %wg.3",
            "  %yg.0 = mul i64 %g, %og", "  %yg.1 = mul i64 %yg.0, %ycs",
            f"  %yg = getelementptr {yt}, ptr %y, i64 %yg.1", f"  %bg.0 = mul i64 %wg.0, {ob}",
            "  %bg = getelementptr float, ptr %bias, i64 %bg.0"]  # fmt: skip
    # for blk (ob output channels): how many are real, where their weights start
    out += ["  store i64 0, ptr %blk.a", *loop("blk", "%nblk", "g.next"),
            f"  %o0 = mul i64 %blk, {ob}", "  %ov.0 = sub i64 %og, %o0",
            f"  %ov.1 = icmp slt i64 %ov.0, {ob}", f"  %ov = select i1 %ov.1, i64 %ov.0, i64 {ob}",
            "  %wb.0 = mul i64 %blk, %cg", "  %wb.1 = mul i64 %wb.0, %taps",
            f"  %wb.2 = mul i64 %wb.1, {ob}", "  %wb = getelementptr float, ptr %wg, i64 %wb.2",
            "  store i64 0, ptr %p0.a", *loop("p0", "%npix", "blk.next")]  # fmt: skip
    # for p0 (pix positions): where each reads, accumulators at the bias or zero
    for p in range(pix):
        out += [f"  %pi{p}.0 = add i64 %p0, {p}", f"  %pi{p}.1 = icmp slt i64 %pi{p}.0, %last",
                f"  %pi{p} = select i1 %pi{p}.1, i64 %pi{p}.0, i64 %last",
                f"  %pb{p}.p = getelementptr i64, ptr %pixbase, i64 %pi{p}",
                f"  %pb{p} = load i64, ptr %pb{p}.p", f"  %px{p} = getelementptr float, ptr %xg, i64 %pb{p}"]  # fmt: skip
    out += ["  br i1 %hb, label %init.bias, label %init.zero", "init.bias:"]
    for k in range(nv):
        out += [f"  %bv{k}.0 = add i64 %o0, {k * lanes}",
                f"  %bv{k}.p = getelementptr float, ptr %bg, i64 %bv{k}.0",
                f"  %bv{k} = load {v}, ptr %bv{k}.p, align 4"]  # fmt: skip
        out += [f"  store {v} %bv{k}, ptr %acc{k}_{p}" for p in range(pix)]
    out += ["  br label %init.done", "init.zero:"]
    out += [f"  store {v} zeroinitializer, ptr %acc{k}_{p}" for k, p in accs]
    # for c (input channel), for t (tap): nv x pix multiply-adds
    out += ["  br label %init.done", "init.done:", "  store i64 0, ptr %c.a",
            *loop("c", "%cg", "sum.done"), "  %xc = mul i64 %c, %xcs",
            "  %wc.0 = mul i64 %c, %taps", f"  %wc.1 = mul i64 %wc.0, {ob}",
            "  %wc = getelementptr float, ptr %wb, i64 %wc.1",
            "  store i64 0, ptr %t.a", *loop("t", "%taps", "c.next"),
            "  %to.p = getelementptr i64, ptr %tapoff, i64 %t", "  %to = load i64, ptr %to.p",
            "  %off = add i64 %xc, %to", f"  %wt.0 = mul i64 %t, {ob}",
            "  %wt = getelementptr float, ptr %wc, i64 %wt.0"]  # fmt: skip
    for k in range(nv):
        out += [f"  %wp{k} = getelementptr float, ptr %wt, i64 {k * lanes}",
                f"  %wv{k} = load {v}, ptr %wp{k}, align 4"]  # fmt: skip
    out += _broadcast_fmas(
        [f"%wv{k}" for k in range(nv)], [f"%px{p}" for p in range(pix)], "%off", lanes
    )
    out += [*step("t"), "c.next:", *step("c"), "sum.done:"]
    # store: the accumulators into %tmp (pix, ob), then the real channels x positions into y
    for k, p in accs:
        out += [f"  %f{k}_{p} = load {v}, ptr %acc{k}_{p}",
                f"  %fp{k}_{p} = getelementptr float, ptr %tmp, i64 {p * ob + k * lanes}",
                f"  store {v} %f{k}_{p}, ptr %fp{k}_{p}, align 4"]  # fmt: skip
    out += [f"  %pe.0 = add i64 %p0, {pix}", "  %pe.1 = icmp slt i64 %pe.0, %npix",
            "  %pe = select i1 %pe.1, i64 %pe.0, i64 %npix", "  %np = sub i64 %pe, %p0",
            "  store i64 0, ptr %o.a", *loop("o", "%ov", "p0.next"),
            "  %yo.0 = add i64 %o0, %o", "  %yo.1 = mul i64 %yo.0, %ycs",
            f"  %yo = getelementptr {yt}, ptr %yg, i64 %yo.1",
            "  store i64 0, ptr %q.a", *loop("q", "%np", "o.next"),
            f"  %tq.0 = mul i64 %q, {ob}", "  %tq.1 = add i64 %tq.0, %o",
            "  %tq = getelementptr float, ptr %tmp, i64 %tq.1", "  %tv = load float, ptr %tq",
            "  %pq = add i64 %p0, %q", "  %yq.p = getelementptr i64, ptr %pixout, i64 %pq",
            "  %yq.0 = load i64, ptr %yq.p", f"  %yq = getelementptr {yt}, ptr %yo, i64 %yq.0",
            *store("%tv", "%yq", yt, lanes=1),
            *step("q"), "o.next:", *step("o"), "p0.next:", *step("p0", str(pix)),
            "blk.next:", *step("blk"), "g.next:", *step("g"), "exit:", "  ret void", "}"]  # fmt: skip
    return "\n".join(out)


def pack(wt: str = "float") -> str:
    """``@kernel(src, dst, groups, og, nblk, ob, j, ld)``: the layout of the forward kernels'
    weights and of the channel-vector weight gradient's dy. dst[g, b, i, o] = src[g, b * ob +
    o, i] (0 where b * ob + o >= og), for src (G, og, j) of type ``wt`` (half widened) whose
    rows are ``ld`` elements apart and dst (G, nblk, j, ob) floats: a transpose in tiles of
    8 x 8, each loaded as 8 vectors of a row and stored as 8 vectors of a column (NumPy's
    transposing copy of a c256 3x3 weight takes 0.7-1.8 ms). ob: a multiple of 8."""
    v, h = "<8 x float>", "<8 x half>"
    out = ["define void @kernel(ptr noalias %src, ptr noalias %dst, i64 %groups, i64 %og, "
           "i64 %nblk, i64 %ob, i64 %j, i64 %ld) {", "entry:"]  # fmt: skip
    out += [f"  %{n}.a = alloca i64" for n in ("g", "o8", "i8", "r", "i", "e")]
    out += ["  %rows = mul i64 %nblk, %ob", "  %jfull = and i64 %j, -8",
            "  store i64 0, ptr %g.a", *loop("g", "%groups", "exit"),
            "  %sg.0 = mul i64 %g, %og", "  %sg.1 = mul i64 %sg.0, %ld",
            f"  %sg = getelementptr {wt}, ptr %src, i64 %sg.1", "  %dg.0 = mul i64 %g, %rows",
            "  %dg.1 = mul i64 %dg.0, %j", "  %dg = getelementptr float, ptr %dst, i64 %dg.1",
            # for o8 (8 rows of the padded source: output channels o8..o8+8)
            "  store i64 0, ptr %o8.a", *loop("o8", "%rows", "g.next"),
            "  %blk = udiv i64 %o8, %ob", "  %ob.in = urem i64 %o8, %ob",
            "  %db.0 = mul i64 %blk, %j", "  %db.1 = mul i64 %db.0, %ob", "  %db.2 = add i64 %db.1, %ob.in",
            "  %db = getelementptr float, ptr %dg, i64 %db.2",
            "  store i64 0, ptr %i8.a", *loop("i8", "%jfull", "tail")]  # fmt: skip
    for r in range(8):  # row o8 + r, values i8..i8+8 (zeros past og)
        out += [f"  %o{r} = add i64 %o8, {r}", f"  %real{r} = icmp slt i64 %o{r}, %og",
                f"  %os{r} = select i1 %real{r}, i64 %o{r}, i64 0",
                f"  %sp{r}.0 = mul i64 %os{r}, %ld", f"  %sp{r}.1 = add i64 %sp{r}.0, %i8",
                f"  %sp{r} = getelementptr {wt}, ptr %sg, i64 %sp{r}.1"]  # fmt: skip
        if wt == "half":
            out += [
                f"  %lh{r} = load {h}, ptr %sp{r}, align 2",
                f"  %l{r} = fpext {h} %lh{r} to {v}",
            ]
        else:
            out += [f"  %l{r} = load {v}, ptr %sp{r}, align 4"]
        out += [f"  %m{r} = select i1 %real{r}, {v} %l{r}, {v} zeroinitializer"]
    for c in range(8):  # column i8 + c: lane c of each row
        vec = "poison"
        for r in range(8):
            out += [f"  %e{c}_{r} = extractelement {v} %m{r}, i32 {c}",
                    f"  %t{c}_{r} = insertelement {v} {vec}, float %e{c}_{r}, i32 {r}"]  # fmt: skip
            vec = f"%t{c}_{r}"
        out += [f"  %dc{c}.0 = add i64 %i8, {c}", f"  %dc{c}.1 = mul i64 %dc{c}.0, %ob",
                f"  %dc{c} = getelementptr float, ptr %db, i64 %dc{c}.1",
                f"  store {v} {vec}, ptr %dc{c}, align 4"]  # fmt: skip
    out += [*step("i8", "8"), "tail:",  # the last j % 8 columns, one value at a time
            "  store i64 %jfull, ptr %i.a", *loop("i", "%j", "o8.next"),
            "  store i64 0, ptr %r.a", *loop("r", "8", "i.next"),
            "  %to = add i64 %o8, %r", "  %treal = icmp slt i64 %to, %og",
            "  br i1 %treal, label %t.load, label %t.zero", "t.load:",
            "  %ts.0 = mul i64 %to, %ld", "  %ts.1 = add i64 %ts.0, %i",
            f"  %ts = getelementptr {wt}, ptr %sg, i64 %ts.1", f"  %tv = load {wt}, ptr %ts"]  # fmt: skip
    out += ["  %tf = fpext half %tv to float"] if wt == "half" else []
    out += ["  br label %t.store", "t.zero:", "  br label %t.store", "t.store:",
            f"  %val = phi float [ 0.0, %t.zero ], [ {'%tf' if wt == 'half' else '%tv'}, %t.load ]",
            "  %td.0 = mul i64 %i, %ob", "  %td.1 = add i64 %td.0, %r",
            "  %td = getelementptr float, ptr %db, i64 %td.1", "  store float %val, ptr %td",
            *step("r"), "i.next:", *step("i"), "o8.next:", *step("o8", "8"), "g.next:",
            *step("g"), "exit:", "  ret void", "}"]  # fmt: skip
    return "\n".join(out)


def filter_grad(nv: int, rb: int, lanes: int) -> str:
    """``@kernel(x, dyt, dw, groups, cg, nblk, xcs, pixbase, npix, joff, nj)``: the weight
    gradient with vectors along the output channels. For each group's block of ``ob = nv *
    lanes`` output channels and ``rb`` consecutive (channel, tap) indices j (j = c * taps + t,
    read at ``joff[j]`` = c * xcs + tapoff[t]): dw[g, b, j, :] += sum over positions p <
    npix of dyt[g, b, p, :] * x[g's planes + joff[j] + pixbase[p]]; per position ``nv`` dy
    vectors loaded, ``rb`` input values broadcast. x as in :func:`forward`; dyt:
    (G, nblk, npix, ob) and dw: (G, nblk, nj, ob) floats (dw is added to: a caller may
    sum ranges of positions in turns). The last block's j past nj repeat the last one and
    are not stored."""
    v, fma, ob = f"<{lanes} x float>", f"@llvm.fmuladd.v{lanes}f32", nv * lanes
    accs = [(k, r) for k in range(nv) for r in range(rb)]
    out = [f"declare {v} {fma}({v}, {v}, {v})",
           "define void @kernel(ptr noalias %x, ptr noalias %dyt, ptr noalias %dw, i64 %groups, "
           "i64 %cg, i64 %nblk, i64 %xcs, ptr %pixbase, i64 %npix, ptr %joff, i64 %nj) {",
           "entry:"]  # fmt: skip
    out += [f"  %acc{k}_{r} = alloca {v}, align 64" for k, r in accs]
    out += [f"  %{n}.a = alloca i64" for n in ("g", "blk", "j0", "p")]
    out += ["  %lastj = sub i64 %nj, 1", "  store i64 0, ptr %g.a", *loop("g", "%groups", "exit"),
            "  %xg.0 = mul i64 %g, %cg", "  %xg.1 = mul i64 %xg.0, %xcs",
            "  %xg = getelementptr float, ptr %x, i64 %xg.1",
            "  store i64 0, ptr %blk.a", *loop("blk", "%nblk", "g.next"),
            "  %gb.0 = mul i64 %g, %nblk", "  %gb = add i64 %gb.0, %blk",
            "  %dyb.0 = mul i64 %gb, %npix", f"  %dyb.1 = mul i64 %dyb.0, {ob}",
            "  %dyb = getelementptr float, ptr %dyt, i64 %dyb.1",
            "  %dwb.0 = mul i64 %gb, %nj", f"  %dwb.1 = mul i64 %dwb.0, {ob}",
            "  %dwb = getelementptr float, ptr %dw, i64 %dwb.1",
            "  store i64 0, ptr %j0.a", *loop("j0", "%nj", "blk.next")]  # fmt: skip
    for r in range(rb):  # where (channel, tap) j0 + r reads; its running sums from dw
        out += [f"  %jr{r}.0 = add i64 %j0, {r}", f"  %jr{r}.1 = icmp slt i64 %jr{r}.0, %lastj",
                f"  %jr{r} = select i1 %jr{r}.1, i64 %jr{r}.0, i64 %lastj",
                f"  %jo{r}.p = getelementptr i64, ptr %joff, i64 %jr{r}",
                f"  %jo{r} = load i64, ptr %jo{r}.p", f"  %xj{r} = getelementptr float, ptr %xg, i64 %jo{r}"]  # fmt: skip
        for k in range(nv):
            out += [f"  %dp{k}_{r}.0 = mul i64 %jr{r}.0, {ob}", f"  %dp{k}_{r}.1 = add i64 %dp{k}_{r}.0, {k * lanes}",
                    f"  %dp{k}_{r} = getelementptr float, ptr %dwb, i64 %dp{k}_{r}.1"]  # fmt: skip
    out += ["  %jv = sub i64 %nj, %j0"]  # how many of the rb are real
    for k, r in accs:
        out += [f"  %init{k}_{r}.ok = icmp slt i64 {r}, %jv", f"  br i1 %init{k}_{r}.ok, label %init{k}_{r}, label %init{k}_{r}.no",
                f"init{k}_{r}:", f"  %iv{k}_{r} = load {v}, ptr %dp{k}_{r}, align 4",
                f"  store {v} %iv{k}_{r}, ptr %acc{k}_{r}", f"  br label %init{k}_{r}.done",
                f"init{k}_{r}.no:", f"  store {v} zeroinitializer, ptr %acc{k}_{r}",
                f"  br label %init{k}_{r}.done", f"init{k}_{r}.done:"]  # fmt: skip
    out += ["  store i64 0, ptr %p.a", *loop("p", "%npix", "sums"),
            "  %pb.p = getelementptr i64, ptr %pixbase, i64 %p", "  %pb = load i64, ptr %pb.p",
            f"  %dyp.0 = mul i64 %p, {ob}", "  %dyp = getelementptr float, ptr %dyb, i64 %dyp.0"]  # fmt: skip
    for k in range(nv):
        out += [f"  %dv{k}.p = getelementptr float, ptr %dyp, i64 {k * lanes}",
                f"  %dv{k} = load {v}, ptr %dv{k}.p, align 4"]  # fmt: skip
    out += _broadcast_fmas(
        [f"%dv{k}" for k in range(nv)], [f"%xj{r}" for r in range(rb)], "%pb", lanes
    )
    out += [*step("p"), "sums:"]
    for k, r in accs:
        out += [f"  %st{k}_{r}.ok = icmp slt i64 {r}, %jv", f"  br i1 %st{k}_{r}.ok, label %st{k}_{r}, label %st{k}_{r}.done",
                f"st{k}_{r}:", f"  %sv{k}_{r} = load {v}, ptr %acc{k}_{r}",
                f"  store {v} %sv{k}_{r}, ptr %dp{k}_{r}, align 4", f"  br label %st{k}_{r}.done",
                f"st{k}_{r}.done:"]  # fmt: skip
    out += [*step("j0", str(rb)), "blk.next:", *step("blk"), "g.next:", *step("g"), "exit:",
            "  ret void", "}"]  # fmt: skip
    return "\n".join(out)
