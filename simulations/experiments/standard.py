"""The ``standard`` procedure: train as the hospitals do (in process, or a federated simulation)."""

from __future__ import annotations

from simulations.experiments.inprocess import train_sites
from simulations.experiments.procedures import Job, JobResult, Procedure, in_process_result, register_procedure


def run_standard(job: Job) -> JobResult:
    """Centralized and local: the hospitals' trainers in this process; federated: a Flower simulation."""
    exp = job.experiment
    if job.setting == "federated":
        from simulations.experiments.federated import spent_epsilon, train_federated  # Flower, only when needed

        metrics, curve = train_federated(job.run, job.config, job.sites, exp.steps, exp.rounds, job.seed, job.folder)
        for point in curve:
            job.show(point)
        return JobResult(metrics, curve, curve[-1].seconds if curve else 0.0, job.sites,
                         entry={"epsilon": spent_epsilon(job.folder)})
    eval_sites = job.eval_sites
    trained = train_sites(job.config, eval_sites, exp.steps, exp.eval_every, job.seed + exp.training_seed_offset,
                          on_point=job.show)
    return in_process_result(eval_sites, trained, {"last_round": trained[0].rounds[-1] if trained[0].rounds else {}})


register_procedure(Procedure("standard", run=run_standard, federated=True))
