"""`make bench`'s table: goals on nested metrics (generate's greedy./sampled.) are looked up and marked."""

from bayesflip.bench import goal_of, print_table


def test_print_table_marks_nested_goals(capsys):
    res = {"generate": {"prompts": 16,
                        "greedy": {"ratio_engine_over_hf": 1.05, "sampler_host_syncs_per_step": 0.0,
                                   "greedy_rows_identical_to_hf": "16/16"},
                        "sampled": {"ratio_engine_over_hf": 0.95, "sampler_host_syncs_per_step": 2.0}},
           "padding": {"padding": 0.05}}
    print_table(res)
    lines = {ln.split()[1]: ln for ln in capsys.readouterr().out.splitlines()[1:]}
    assert lines["greedy.ratio_engine_over_hf"].rstrip().endswith(">= 0.95  met")
    assert lines["sampled.ratio_engine_over_hf"].rstrip().endswith(">= 1.0  MISSED")
    assert lines["greedy.sampler_host_syncs_per_step"].rstrip().endswith("<= 0  met")
    assert lines["sampled.sampler_host_syncs_per_step"].rstrip().endswith("<= 0  MISSED")
    assert lines["greedy.greedy_rows_identical_to_hf"].rstrip().endswith("all agree  met")
    assert lines["padding"].rstrip().endswith("<= 0.1  met")
    assert lines["prompts"].rstrip().endswith("16")  # no goal: value only


def test_goal_lookup_exact_then_wildcard():
    assert goal_of("generate", "greedy.ratio_engine_over_hf") == (">=", 0.95)
    assert goal_of("generate", "sampled.ratio_engine_over_hf") == (">=", 1.0)
    assert goal_of("generate", "anything.sampler_host_syncs_per_step") == ("<=", 0)
    assert goal_of("generate", "greedy.engine_s") is None
    assert goal_of("icl_curve", "speedup") == (">=", 100)
