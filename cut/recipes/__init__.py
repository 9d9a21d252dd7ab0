"""The CUT paper's own recipes, as its release (wwxu21/CUT) runs them.

    convert   the Summarization and Shepherd releases -> cut records (scripts/convert2alpaca.py)
    iterate   CUT rounds on judged files given in advance: the online recipe on the released data
    harness   ranking-based evaluation (ARC, HellaSwag, MMLU, TruthfulQA) through lm-eval

The training recipes themselves are configs: configs/paper_offline_shepherd.yaml (cut.train) and
configs/paper_online_13b.yaml (cut.recipes.iterate); AlpacaEval answers: cut generate --preset
alpaca_eval.
"""
