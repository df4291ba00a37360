"""Integrations with training frameworks (the Hugging Face Trainer: :mod:`emoq.integrations.transformers`)."""

MIN_TRAINER_SCOPE = 1e-2


def scope_problem(optimizer_name: str, scope: float) -> str | None:
    """Why ``lr=scope`` is a mistake in a trainer (a learning rate taken for the pulse scope), or ``None``.

    ``lr`` is the emoPulse scope, not a learning rate: a learning-rate-sized value (e.g. the
    Trainer's 5e-5 copied into the optimizer kwargs) scales every step size of every pulse variant
    down by ``1/scope`` (v3.8: ``eta = clamp(hist * scope * 1e-4, 1e-6, 3e-3)`` sits at its 1e-6
    floor unless hist grows 100-fold), and training crawls without error.
    """
    if scope >= MIN_TRAINER_SCOPE:
        return None
    return (f"{optimizer_name}(lr={scope:g}): lr is the emoPulse scope (default 1.0), not a learning rate; this "
            f"value makes every step size up to {1 / scope:.3g} times smaller than at lr=1.0 (pulse='v3.8' pins it to "
            "its 1e-6 floor). "
            "Drop lr from the optimizer kwargs "
            "(TrainingArguments.learning_rate has no effect on emoq optimizers)")
