"""Analyses of trained models: ablations, layer importance, distillation, probes, statistics and plots."""
