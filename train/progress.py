"""The command line's progress bar: steps, with the latest loss and eval loss beside it."""

from __future__ import annotations

from transformers.trainer_callback import ProgressCallback


class LossBar(ProgressCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None and state.global_step:  # resumed: start where it was
            self.training_bar.update(state.global_step)
            self.current_step = state.global_step
        self.postfix: dict[str, str] = {}

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is None or not logs:
            return
        for key in ("loss", "eval_loss", "learning_rate"):
            if isinstance(logs.get(key), float):
                self.postfix[key.replace("learning_rate", "lr")] = f"{logs[key]:.4g}"
        self.training_bar.set_postfix(self.postfix, refresh=True)
