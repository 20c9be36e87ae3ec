"""RolloutBuffer: storage filled in chunks gives the same numbers as the functions."""
import numpy as np

from minirlhf import rollout


def chunk(rng, n, t):
    lengths = rng.integers(1, t + 1, n)
    return dict(tokens=rng.integers(0, 1000, (n, t)), old_logprobs=-rng.random((n, t), np.float32),
                ref_logprobs=-rng.random((n, t), np.float32), values=rng.standard_normal((n, t), np.float32),
                scores=rng.standard_normal(n).astype(np.float32), lengths=lengths, hit_max=lengths == t)


def test_buffer_equals_functions_on_padded_arrays():
    rng = np.random.default_rng(0)
    parts = [chunk(rng, 5, 7), chunk(rng, 3, 12), chunk(rng, 1, 1)]
    buf = rollout.RolloutBuffer(capacity=10, max_len=12)
    assert buf.add(**parts[0]) == slice(0, 5)
    buf.add(**parts[1])
    buf.add(**parts[2])
    assert len(buf) == 9 and buf.advantages.shape == (9, 12)

    def padded(key, dtype):
        out = np.zeros((9, 12), dtype)
        row = 0
        for p in parts:
            out[row:row + len(p[key]), :p[key].shape[1]] = p[key]
            row += len(p[key])
        return out

    cat = {k: np.concatenate([p[k] for p in parts]) for k in ("scores", "lengths", "hit_max")}
    kw = dict(kl_coef=0.2, no_eos_penalty=-1.0, reward_clip=1.5)
    buf.compute(gamma=0.99, lam=0.9, **kw)
    old, ref, values = padded("old_logprobs", np.float32), padded("ref_logprobs", np.float32), padded("values", np.float32)
    rewards = rollout.assemble_rewards(old, ref, cat["scores"], cat["lengths"], kw["kl_coef"],
                                       no_eos_penalty=-1.0, hit_max=cat["hit_max"], reward_clip=1.5)
    adv, ret = rollout.gae(rewards, values, cat["lengths"], 0.99, 0.9)
    np.testing.assert_array_equal(buf.rewards, rewards)
    np.testing.assert_array_equal(buf.returns, ret)
    np.testing.assert_array_equal(buf.advantages, rollout.whiten(adv, cat["lengths"]))
    np.testing.assert_array_equal(buf.tokens, padded("tokens", np.int64))

    seen = []
    for mb in buf.minibatches(4, seed=7):
        idx = mb["index"]
        width = buf.lengths[idx].max()
        assert len(idx) <= 4
        for key in ("tokens", "advantages", "returns", "old_logprobs", "values"):
            np.testing.assert_array_equal(mb[key], getattr(buf, key)[idx, :width])
        np.testing.assert_array_equal(mb["lengths"], buf.lengths[idx])
        seen += idx.tolist()
    assert sorted(seen) == list(range(9))

    buf.clear()
    assert len(buf) == 0
    buf.add(**parts[2])
    buf.compute(gamma=1.0, lam=1.0, kl_coef=0.0, whiten_advantages=False)
    # gamma = lam = 1, no KL term, one token: the return is the score.
    assert buf.returns[0, 0] == parts[2]["scores"][0]
