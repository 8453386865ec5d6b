# Cluster resources of every rule: limits that grow on a retry only for the failure that more
# of them would have avoided, and the jobs' partition and account. Needs nothing else of the
# workflow (tests/test_slurm.py includes it in a Snakefile of its own).

import os

from cellflow.retries import (
    partition_limits,
    previous_failures,
    retried_limit,
    slurm_log_folder,
)

# A job's place on a cluster: sbatch's own variables would lose to the partition that the
# SLURM executor names on every submission, so they become the jobs' resources here.
CLUSTER_PLACEMENT = {
    resource: os.environ[variable]
    for resource, variable in (
        ("slurm_partition", "SBATCH_PARTITION"),
        ("slurm_account", "SBATCH_ACCOUNT"),
    )
    if os.environ.get(variable)
}


def take_limit_overrides(overrides):
    """Constant `--set-resources RULE:mem_mb=...` / `RULE:runtime=...` as the first attempt's
    limits: left to Snakemake, they would replace the retry rule below on every attempt.
    """
    taken = {}
    for rule, resources in overrides.items():
        for name in ("mem_mb", "runtime"):
            if name in resources.keys() and not resources[name].is_evaluable():
                taken.setdefault(rule, {})[name] = int(resources[name].value)
                # Snakemake has no public way to drop one (tests/test_slurm.py pins this)
                del resources._data[name]
        partition = resources.get("slurm_partition")
        if partition is not None:  # kept: here it only caps the retries
            name = partition.raw if partition.is_evaluable() else partition.value
            taken.setdefault(rule, {})["slurm_partition"] = str(name).strip("'\"")
    return taken


LIMIT_OVERRIDES = take_limit_overrides(workflow.resource_settings.overwrite_resources)


# The SLURM executor's log folder (--slurm-logdir), where a retry reads why earlier attempts
# failed.
SLURM_LOGS = (
    getattr(workflow.executor_settings, "logdir", None) or ".snakemake/slurm_logs"
)


def retried(resource, base):
    """A limit that a retry raises only after a failure that more of it would have avoided
    (time after a time-out, memory after running out of it), up to what the partition offers.
    """

    def limit(wildcards, attempt, rulename):
        given = base(wildcards) if callable(base) else base
        first = LIMIT_OVERRIDES.get(rulename, {}).get(resource, given)
        if attempt == 1:
            return first
        # inside its own SLURM job (where Snakemake evaluates it again) a job's own log is not
        # one of its earlier attempts'
        own_log = f"{os.environ.get('SLURM_JOB_ID')}.log"
        failures = previous_failures(
            slurm_log_folder(SLURM_LOGS, rulename, wildcards),
            attempt - 1,
            exclude=own_log,
        )
        partition = LIMIT_OVERRIDES.get(rulename, {}).get(
            "slurm_partition", CLUSTER_PLACEMENT.get("slurm_partition")
        )
        cap = partition_limits(partition).get(resource)
        return retried_limit(resource, first, failures, cap)

    return limit


def cluster_limits(mem_mb, runtime):
    """A job's memory (MB), time (minutes; or a function of the wildcards) and cluster
    placement, as rule resources."""
    return {
        "mem_mb": retried("mem_mb", mem_mb),
        "runtime": retried("runtime", runtime),
        **CLUSTER_PLACEMENT,
    }
