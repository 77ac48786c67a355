"""How a job runs, not what it computes: the runner every rule's script calls (its log,
threads, GPU, policy, and its outputs made complete or absent with provenance), the warm-start
server, GPU claims, the torchrun launcher and the code digest. No code here is a rerun trigger
(code_digest.INFRASTRUCTURE): it may refuse, schedule or log, and nothing it produces reaches
an output."""
