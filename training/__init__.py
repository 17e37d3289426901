"""Instruct Edit training package: fine-tuning, evaluation and training-data generation."""
