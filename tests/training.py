"""The training step the tests share."""


def backward_and_step(loss, opt, scaler=None):
    """One optimizer step on ``loss``: backward with a graph when a Hessian step is due,
    through ``scaler`` (a torch.amp.GradScaler) when one is given."""
    if scaler is None:
        loss.backward(create_graph=opt.hessian_due)
        opt.step()
    else:
        scaler.scale(loss).backward(create_graph=opt.hessian_due)
        scaler.step(opt)
        scaler.update()
