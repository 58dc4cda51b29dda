from dora_tune.tuning.trials import op_bytes, op_flops, train_bwd_stage


def test_train_stage_two_pairs_best_forward_with_every_backward():
    stage = train_bwd_stage({"block_r": 1, "block_c": 1024, "num_warps": 4})
    assert len(stage) == len({str(c["bwd"]) for c in stage}) > 10
    assert all(c["fwd"]["block_c"] == 1024 for c in stage)


def test_bytes_and_flops_models():
    assert op_bytes("compose", {"rows": 2, "cols": 4}, "bf16") == 3 * 8 * 2
    assert op_bytes("compose_train", {"rows": 2, "cols": 4}, "fp32") == 8 * 8 * 4
    assert op_flops("norm", {"d_out": 4, "d_in": 8, "r": 2}) == 2 * 4 * 8 * 2 + 2 * 4 * 12
