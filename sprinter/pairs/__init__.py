"""Stage 0: the draft/target pair: loading one by Hub name or path (`load`), and building one offline (`build`)."""
