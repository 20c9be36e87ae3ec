"""The reward contract: the score PPO receives for a response is the score the RM gives it in
training and evaluation (read at the EOS that ends the exchange, appended to truncated
rollouts); pairs that are identical after framing carry no preference."""
import torch

from minirlhf import checkpoint, reward
from minirlhf.data import Comparison, read_preferences
from minirlhf.evaluate import evaluate_policy
from minirlhf.generate import generate
from minirlhf.stages.rm import drop_tied_pairs
from minirlhf.tokenizer import frame_batch

PROMPTS = ["What does the fox eat?", "Where is Quito? Answer in one sentence.", "List two facts about the dog.",
           "What does the owl eat? Answer in one word."] * 4


def _models(tiny_run):
    run_dir = tiny_run[0]
    rm = checkpoint.load_model_from(run_dir / "rm").eval()
    with torch.no_grad():  # a head that reads the hidden state, so the position read matters
        rm.scalar_head.weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))
    return checkpoint.load_model_from(run_dir / "ppo").eval(), rm, checkpoint.load_tokenizer(run_dir / "rm")


def _rollouts(tok, items):
    """A Generation holding the given (prompt, response text, truncated) rollouts, laid out as
    generate() lays them out: left-padded prompts, right-padded responses, EOS ending the
    finished ones."""
    from minirlhf.generate import Generation, left_pad

    prompt_tokens, prompt_mask = left_pad([tok.prompt_ids(p) for p, _, _ in items], tok.pad_id)
    resp = [tok.encode(r) + ([] if truncated else [tok.eos_id]) for _, r, truncated in items]
    R = max(map(len, resp))
    tokens = torch.full((len(items), R), tok.pad_id)
    mask = torch.zeros((len(items), R), dtype=torch.bool)
    for i, ids in enumerate(resp):
        tokens[i, :len(ids)], mask[i, :len(ids)] = torch.tensor(ids), True
    return Generation(prompt_tokens, prompt_mask, tokens, torch.zeros(tokens.shape), mask,
                      mask.sum(1), torch.tensor([t for _, _, t in items]))


def test_ppo_score_equals_the_rm_score_of_the_same_text_finished_or_truncated(tiny_run):
    _, rm, tok = _models(tiny_run)
    texts = ["The fox eats berries and the fox", "Berries.", "Quito is in Ecuador.", "The owl eats mice and"]
    items = [(p, r, truncated) for p, r in zip(PROMPTS, texts) for truncated in (False, True)]
    gen = _rollouts(tok, items)
    with torch.no_grad():
        ppo_scores = reward.score_rollouts(rm, gen, tok.eos_id)
    text_scores = reward.score_texts(rm, tok, [p for p, _, _ in items], [r for _, r, _ in items], rm.cfg.max_seq_len)
    torch.testing.assert_close(ppo_scores, text_scores, rtol=0, atol=1e-5)
    # reading a truncated response at its last generated token (the old convention) gives another number
    tokens, attn = gen.full()
    with torch.no_grad():
        at_last_token = reward.scores(rm, tokens, attn, gen.prompt_tokens.size(1) + gen.lengths - 1)
    assert (at_last_token[gen.truncated] - ppo_scores[gen.truncated]).abs().min() > 1e-3
    torch.testing.assert_close(at_last_token[~gen.truncated], ppo_scores[~gen.truncated])


def test_the_truncation_penalty_comes_on_top_of_the_rm_score():
    from minirlhf.stages.ppo import per_token_rewards

    scores, lengths = torch.tensor([0.7, 0.7]), torch.tensor([2, 2])
    r = per_token_rewards(torch.zeros(2, 2), torch.zeros(2, 2), scores, lengths, 0.1,
                          truncated=torch.tensor([False, True]), truncation_penalty=-1.0)
    torch.testing.assert_close(r, torch.tensor([[0.0, 0.7], [0.0, 0.7 - 1.0]]))


def test_evaluation_reports_the_score_ppo_receives(tiny_run):
    policy, rm, tok = _models(tiny_run)
    cached = policy.forward_cached
    eos_bonus = torch.zeros(policy.cfg.vocab_size)
    eos_bonus[tok.eos_id] = 4.0  # EOS likely enough that some responses finish and some are truncated
    policy.forward_cached = lambda *a, **k: cached(*a, **k) + eos_bonus
    out = evaluate_policy(policy, tok, PROMPTS, rm=rm, max_new_tokens=5, seed=3, batch_size=len(PROMPTS))
    gen = generate(policy, [tok.prompt_ids(p) for p in PROMPTS], max_new_tokens=5, eos_id=tok.eos_id,
                   pad_id=tok.pad_id, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ppo_scores = reward.score_rollouts(rm, gen, tok.eos_id)
    assert 0 < out["truncated_frac"] < 1
    torch.testing.assert_close(torch.tensor(out["rm_scores"]), ppo_scores, rtol=0, atol=1e-5)


def test_a_perfect_scorer_is_perfect_despite_a_duplicate_response(tiny_run, monkeypatch):
    _, rm, tok = _models(tiny_run)
    # ranking best..worst: a, b, b (the same text twice), c → 6 pairs, 1 of them a tie
    responses = ["Berries.", "It eats fish.", "It eats fish.", "Quito is a city."]
    c = Comparison("What does the fox eat?", responses, [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])
    perfect = {"Berries.": 3.0, "It eats fish.": 2.0, "Quito is a city.": 1.0}
    monkeypatch.setattr(reward, "score_texts", lambda m, t, ps, rs, L: torch.tensor([perfect[r] for r in rs]))
    acc = reward.pairwise_accuracy(rm, tok, [c], 96)
    assert acc == {"acc_vs_labels": 1.0, "pairs": 5, "tied_pairs": 1}


def test_long_prompts_keep_their_end_and_the_whole_response(tiny_run):
    _, _, tok = _models(tiny_run)
    prompt = "Tell me about the fox. " * 120 + "What does the fox eat?"
    assert len(tok.prompt_ids(prompt)) > 96
    c = Comparison(prompt, ["Berries.", "Fish."], [(0, 1)])
    kept, dropped = drop_tied_pairs(tok, [c], 96)
    assert dropped == 0 and kept[0].pairs == [(0, 1)]
    tokens, attn, resp = frame_batch(tok, [(prompt, "Berries."), (prompt, "Fish.")], 96)
    assert tokens.shape[1] == 96 and attn.all()
    for i, r in enumerate(["Berries.", "Fish."]):
        n = len(tok.response_ids(r))
        assert tokens[i, -n:].tolist() == tok.response_ids(r)  # the whole response and its EOS
        assert resp[i].sum() == n
        tail = tok.prompt_ids(prompt)[-(96 - n):]
        assert tokens[i, :96 - n].tolist() == tail  # the end of the prompt


def test_tied_pairs_of_the_exported_example_file(tiny_run, tmp_path):
    from minirlhf.cli import main

    _, _, tok = _models(tiny_run)
    assert main(["data", "export", str(tmp_path), "--preset", "quick"]) == 0
    comparisons = read_preferences(tmp_path / "preferences.jsonl")
    # independent count: pairs whose two texts are equal
    expected = sum(c.responses[b] == c.responses[w] for c in comparisons for b, w in c.pairs)
    total = sum(len(c.pairs) for c in comparisons)
    kept, dropped = drop_tied_pairs(tok, comparisons, 128)
    assert expected > 0 and dropped == expected
    assert sum(len(c.pairs) for c in kept) == total - expected
