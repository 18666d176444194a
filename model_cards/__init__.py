"""The model cards of the trained ADNet models and their renderer (`python -m model_cards.make_model_cards`)."""
