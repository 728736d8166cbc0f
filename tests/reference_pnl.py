"""The frozen PNL step of lupnl a3fc464 (before the fused head), shared by `tests/test_models.py` (the step must give
the same losses, targets, buffers and gradients) and `tests/bench_step.py` (the "previous" column). Not library code:
a fixed reference, never to be edited along with `lupnl.pnl`."""
import torch
import torch.nn.functional as F

from lupnl.pnl import concat_all_gather, correct_labels, enqueue_, momentum_update_, update_prototypes_


def _instance_loss_v0(q, k, queue, T, queue_labels=None, targets=None):
    """Oracle of `instance_loss` as it was before 1/T was folded into q (lupnl a3fc464), written independently: logits / T,
    log-probabilities by logsumexp, one positive mask for both the plain (own key only) and the label-guided loss."""
    logits = torch.cat([(q * k).sum(dim=1, keepdim=True), q @ queue.t()], dim=1).float() / T
    logp = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    pos = torch.zeros_like(logp, dtype=torch.bool)
    pos[:, 0] = True
    if queue_labels is not None: pos[:, 1:] = queue_labels[None] == targets[:, None]
    loss = (-(logp * pos).sum(dim=1) / pos.sum(dim=1)).mean()
    return loss, 100 * pos.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1).float().mean()


def _forward_v0(self, im_q, im_k=None, labels=None, index=None, proto=True, correct=False, label_guided=False):
    "Frozen copy of `PNL.forward` before the fused head (lupnl a3fc464): clones of the tables, two softmaxes, logits / T."
    out = self.encoder_q(im_q)
    q, zero = out.emb, out.feat.new_zeros((), dtype=torch.float32)
    if self.use_instance:
        with torch.no_grad():
            momentum_update_(self.encoder_k, self.encoder_q, self.m)
            k = self._keys(im_k)
    do_proto, do_correct = self.use_proto and proto, self.use_correction and correct
    proto_logits = q @ self.prototypes.clone().t() / self.T if (do_proto or do_correct) else None
    targets, corrected = labels, None
    if labels is not None:
        corrected = torch.zeros_like(labels, dtype=torch.bool)
        if do_correct: targets, corrected = correct_labels(out.logits.detach(), proto_logits.detach(), labels,
                                                           self.alpha, self.threshold)
    loss_cls = F.cross_entropy(out.logits.float(), targets) if self.use_cls else zero
    loss_proto = F.cross_entropy(proto_logits.float(), targets) if do_proto else zero
    loss_inst, acc_inst = zero, zero
    if self.use_instance:
        guided = self.use_label_guided and label_guided
        loss_inst, acc_inst = _instance_loss_v0(q, k, self.queue.clone(), self.T,
                                                self.queue_labels.clone() if guided else None, targets if guided else None)
    loss = self.w_cls * loss_cls + self.w_proto * loss_proto + self.w_inst * loss_inst
    with torch.no_grad():
        acc_cls = 100 * (out.logits.argmax(1) == targets).float().mean() if self.use_cls else zero
        all_targets = concat_all_gather(targets) if labels is not None else None
        if self.use_instance:
            k_all = concat_all_gather(k)
            enqueue_(self.queue, self.queue_labels, self.queue_ptr, k_all,
                     all_targets if all_targets is not None else torch.full((len(k_all),), -1, device=k_all.device))
        if self.has_prototypes:
            update_prototypes_(self.prototypes, concat_all_gather(q.detach()), all_targets, self.proto_m)
    return dict(loss=loss, loss_cls=loss_cls.detach(), loss_proto=loss_proto.detach(), loss_inst=loss_inst.detach(),
                acc_inst=acc_inst, acc_cls=acc_cls, targets=targets, corrected=corrected)
