"""Client code of the RL frameworks, copied from their repositories (each file names its
repository, path and commit) so that the gateway tests drive the real thing without
installing the frameworks (OpenRLHF pulls deepspeed, ray and CUDA)."""
