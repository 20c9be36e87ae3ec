"""The minibatch order of the C++ library, spelled out in Python: Fisher-Yates driven by
splitmix64 (Steele, Lea & Flood 2014), with rejection against modulo bias.

(Rewards, GAE and whitening have one readable definition, in minirlhf/stages/ppo.py; the
tests compare the C++ path against it and against hand-worked examples.)
"""
MASK64 = (1 << 64) - 1


def splitmix64_permutation(n, seed):
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
