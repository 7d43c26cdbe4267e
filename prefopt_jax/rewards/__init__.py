"""Rewards: functions of completions (VADER sentiment), reward models, ensembles and PAR shaping,
a DPO policy's implicit reward, and scorers that apply them to sampled candidates."""
