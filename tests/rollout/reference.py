"""Independent reference implementations of the rollout bookkeeping.

Written the obvious way: a Python loop per sequence, float64 throughout, no
shared code with minirlhf.rollout.  The tests compare the C++ buffer with these.
"""
import numpy as np


def rewards(old, ref, scores, lengths, kl_coef, no_eos_penalty=0.0, hit_max=None, reward_clip=None):
    B, T = old.shape
    out = np.zeros((B, T))
    for b in range(B):
        n = int(lengths[b])
        for t in range(n):
            out[b, t] = -kl_coef * (float(old[b, t]) - float(ref[b, t]))
        score = float(scores[b])
        if reward_clip is not None:
            score = min(max(score, -reward_clip), reward_clip)
        if hit_max is not None and hit_max[b]:
            score += no_eos_penalty
        out[b, n - 1] += score
    return out


def gae(rewards, values, lengths, gamma, lam):
    B, T = rewards.shape
    adv = np.zeros((B, T))
    ret = np.zeros((B, T))
    for b in range(B):
        n = int(lengths[b])
        running = 0.0
        for t in reversed(range(n)):
            next_value = float(values[b, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[b, t]) + gamma * next_value - float(values[b, t])
            running = delta + gamma * lam * running
            adv[b, t] = running
            ret[b, t] = running + float(values[b, t])
    return adv, ret


def whiten(x, lengths, shift_mean=True):
    valid = np.concatenate([x[b, : int(n)].astype(np.float64) for b, n in enumerate(lengths)])
    mean, var = valid.mean(), valid.var(ddof=1)
    out = np.zeros(x.shape)
    for b, n in enumerate(lengths):
        out[b, :n] = (x[b, :n] - mean) / np.sqrt(var + 1e-8)
        if not shift_mean:
            out[b, :n] += mean
    return out


MASK64 = (1 << 64) - 1


def splitmix64_permutation(n, seed):
    """Fisher-Yates driven by splitmix64, with rejection against modulo bias."""
    state = seed

    def next_u64():
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)

    def below(bound):
        threshold = (1 << 64) % bound
        while True:
            r = next_u64()
            if r >= threshold:
                return r % bound

    perm = list(range(n))
    for i in range(n - 1, 0, -1):
        j = below(i + 1)
        perm[i], perm[j] = perm[j], perm[i]
    return perm


def first_fit_decreasing(lengths, budget):
    """(row_of_seq, offset_of_seq, n_rows): longest first, ties by index, first row with room."""
    order = sorted(range(len(lengths)), key=lambda b: (-int(lengths[b]), b))
    used = []  # tokens used per row
    row_of, offset_of = [0] * len(lengths), [0] * len(lengths)
    for b in order:
        n = int(lengths[b])
        for r, u in enumerate(used):
            if u + n <= budget:
                break
        else:
            used.append(0)
            r = len(used) - 1
        row_of[b], offset_of[b] = r, used[r]
        used[r] += n
    return row_of, offset_of, len(used)
