"""``make demo``: the protocol end to end on synthetic data (:mod:`moco_d2.demo.main`)."""
