"""Slow, literal loop implementations of the method, written from the specification, for tests only.

They use Python floats (double precision) and loop over every problem, row and column, so that they share no code
and no vectorisation trick with `drifting.drift`.
"""

from __future__ import annotations

import math


def _dist(a, b):
    return math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b)))


def _softmaxes(logits):
    """Row softmax (over targets) and column softmax (over generated rows) of a list-of-lists matrix."""
    n, t = len(logits), len(logits[0])
    row = []
    for i in range(n):
        m = max(logits[i])
        e = [math.exp(v - m) for v in logits[i]]
        s = sum(e)
        row.append([v / s for v in e])
    col = [[0.0] * t for _ in range(n)]
    for j in range(t):
        m = max(logits[i][j] for i in range(n))
        e = [math.exp(logits[i][j] - m) for i in range(n)]
        s = sum(e)
        for i in range(n):
            col[i][j] = e[i] / s
    return row, col


def _affinity(logits, normalize, floor):
    n, t = len(logits), len(logits[0])
    row, col = _softmaxes(logits)
    out = [[0.0] * t for _ in range(n)]
    for i in range(n):
        for j in range(t):
            if normalize == "xy":
                out[i][j] = math.sqrt(max(row[i][j] * col[i][j], floor))
            elif normalize == "y":
                out[i][j] = max(row[i][j], math.sqrt(floor))
            else:
                out[i][j] = max(math.exp(logits[i][j]), math.sqrt(floor))
    return out


def _field(a, xs, targets, is_pos, weights, attraction, repulsion):
    """V_i = attraction * sum_pos W+_ij (y_j - x_i) - repulsion * sum_neg W-_ij (y_j - x_i)."""
    n, t, d = len(xs), len(targets), len(xs[0])
    v = []
    for i in range(n):
        aw = [a[i][j] * weights[j] for j in range(t)]
        s_pos = sum(aw[j] for j in range(t) if is_pos[j])
        s_neg = sum(aw[j] for j in range(t) if not is_pos[j])
        vi = [0.0] * d
        for j in range(t):
            if is_pos[j]:
                coef = attraction * aw[j] * s_neg
            else:
                coef = -repulsion * aw[j] * s_pos
            for k in range(d):
                vi[k] += coef * (targets[j][k] - xs[i][k])
        v.append(vi)
    return v


def algorithm2(x, pos, neg, temperature, pos_weight=None, neg_weight=None, normalize="xy", floor=0.0,
               self_negatives=True, attraction=1.0, repulsion=1.0):
    """One problem of Algorithm 2: x [N][D], pos [P][D], neg [M][D] or None (nested lists). Returns V [N][D]."""
    neg = neg or []
    targets, weights, is_pos, self_index = [], [], [], []
    if self_negatives:
        for i, xi in enumerate(x):
            targets.append(xi), weights.append(1.0), is_pos.append(False), self_index.append(i)
    for j, y in enumerate(neg):
        targets.append(y), weights.append(neg_weight[j] if neg_weight else 1.0), is_pos.append(False)
        self_index.append(None)
    for j, y in enumerate(pos):
        targets.append(y), weights.append(pos_weight[j] if pos_weight else 1.0), is_pos.append(True)
        self_index.append(None)
    logits = [[-(_dist(xi, y) + (1e6 if self_index[j] == i else 0.0)) / temperature for j, y in enumerate(targets)]
              for i, xi in enumerate(x)]
    a = _affinity(logits, normalize, floor)
    return _field(a, x, targets, is_pos, weights, attraction, repulsion)


def authors_loss(gen, pos, neg, temperatures, gen_weight=None, pos_weight=None, neg_weight=None):
    """The authors' drift loss, literally as official-code-notes.md section 1.2 describes it.

    gen [B][C_g][S], pos [B][C_p][S], neg [B][C_n][S] or None. Returns (loss [B], scale, drift_ms [R],
    d loss_b / d gen [B][C_g][S]).
    """
    b_count, c_g, s_dim = len(gen), len(gen[0]), len(gen[0][0])
    probs = []
    for b in range(b_count):
        negs = neg[b] if neg is not None else []
        targets = list(gen[b]) + list(negs) + list(pos[b])
        w = ([gen_weight[b][i] if gen_weight else 1.0 for i in range(c_g)]
             + [neg_weight[b][j] if neg_weight else 1.0 for j in range(len(negs))]
             + [pos_weight[b][j] if pos_weight else 1.0 for j in range(len(pos[b]))])
        is_pos = [False] * (c_g + len(negs)) + [True] * len(pos[b])
        d = [[math.sqrt(max(sum(u * u for u in xi) + sum(v * v for v in y) - 2 * sum(u * v for u, v in zip(xi, y)),
                            1e-8)) for y in targets] for xi in gen[b]]
        probs.append((targets, w, is_pos, d))
    # Step 2: one global weighted mean distance.
    num = sum(probs[b][2][0] * 0 for b in range(0))  # placeholder to keep the loops explicit below
    num = 0.0
    den = 0.0
    for targets, w, is_pos, d in probs:
        for i in range(c_g):
            for j in range(len(targets)):
                num += d[i][j] * w[j]
        den += c_g * sum(w)
    scale = num / den
    s_in = max(scale / math.sqrt(s_dim), 1e-3)
    # Steps 4-5: per temperature, the field in scaled coordinates, then its global RMS.
    fields = []  # [R][B][C_g][S]
    for tau in temperatures:
        per_b = []
        for b, (targets, w, is_pos, d) in enumerate(probs):
            logits = [[-(d[i][j] / max(scale, 1e-3) + (100.0 if j == i else 0.0)) / tau
                       for j in range(len(targets))] for i in range(c_g)]
            a = _affinity(logits, "xy", 1e-6)
            x_hat = [[u / s_in for u in xi] for xi in gen[b]]
            y_hat = [[u / s_in for u in y] for y in targets]
            per_b.append(_field(a, x_hat, y_hat, is_pos, w, 1.0, 1.0))
        fields.append(per_b)
    drift_ms = []
    for f in fields:
        total = sum(v * v for per_b in f for vi in per_b for v in vi)
        drift_ms.append(total / (b_count * c_g * s_dim))
    lam = [math.sqrt(max(m, 1e-8)) for m in drift_ms]
    losses, grads = [], []
    for b in range(b_count):
        total, grad_b = 0.0, []
        for i in range(c_g):
            gi = []
            for k in range(s_dim):
                x_hat = gen[b][i][k] / s_in
                goal = x_hat + sum(fields[r][b][i][k] / lam[r] for r in range(len(temperatures)))
                total += (x_hat - goal) ** 2
                gi.append(2 * (x_hat - goal) / (s_in * c_g * s_dim))
            grad_b.append(gi)
        losses.append(total / (c_g * s_dim))
        grads.append(grad_b)
    return losses, scale, drift_ms, grads
