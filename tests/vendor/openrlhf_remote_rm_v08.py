"""OpenRLHF 0.8's whole-batch remote reward client and the code that reads its reply, as
they are.

Repository: https://github.com/OpenRLHF/OpenRLHF
Commit: ac3689ece2666cb524836568b88bfc6016dabc6f (tag v0.8.11)

- ``request_api_wrapper`` and ``remote_rm_fn_ray``: ``openrlhf/utils/remote_rm_utils.py``
  lines 10-33 (last changed in 494850f50342ed38d5ae76ef45a3207f3523b582; the same at
  v0.8.3). ``remote_rm_fn_ray`` is a ``@ray.remote`` function there; here it is the
  plain function ray would run.
- ``get_rewards``: the URL branch of ``RemoteRewardModel.get_rewards`` (same file, lines
  51-83; a ``@ray.remote`` actor there): the batch split evenly over the URLs of
  ``--remote_rm_url``, one ``remote_rm_fn_ray`` per URL, run concurrently as ray would
  (threads here), results in URL order (``ray.get``).
- ``update_samples_with_rewards``: ``openrlhf/trainer/ppo_utils/experience_maker.py``
  lines 208-244 (last changed in fb034ee31db7330cc49ec7a34519ad456c3cc9f2), verbatim:
  ``make_experience`` calls it with the ``get_rewards`` results and the step's samples.

``logger`` is the standard library's in place of ``openrlhf.utils.logging_utils``.
"""
# ruff: noqa
# mypy: ignore-errors

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import requests
import torch

logger = logging.getLogger("openrlhf.utils.remote_rm_utils")


def request_api_wrapper(url, data, try_max_times=5):
    """Synchronous request API wrapper"""
    headers = {
        "Content-Type": "application/json",
    }
    for _ in range(try_max_times):
        try:
            response = requests.post(url=url, json=data, headers=headers, timeout=180)
            response.raise_for_status()  # Raise an HTTPError for bad responses
            response = response.json()
            return response
        except requests.RequestException as e:
            logger.info(f"Request error, please check: {e}")
        except Exception as e:
            logger.info(f"Unexpected error, please check: {e}")
        time.sleep(1)

    raise Exception(f"Request error for {try_max_times} times, returning None. Please check the API server.")


def remote_rm_fn_ray(api_url, queries, prompts, labels):
    return request_api_wrapper(api_url, {"query": queries, "prompts": prompts, "labels": labels})


def get_rewards(remote_rm_url, queries_list, prompts_list, labels_list):
    # Distribute data across different remote reward function servers
    num_servers = len(remote_rm_url)
    batch_size = (len(queries_list) + num_servers - 1) // num_servers
    r_refs = []
    with ThreadPoolExecutor(max_workers=num_servers) as ray:
        for i in range(num_servers):
            start_idx = i * batch_size
            end_idx = min((i + 1) * batch_size, len(queries_list))
            rm = remote_rm_url[i]
            r = ray.submit(
                remote_rm_fn_ray,
                rm,
                queries=queries_list[start_idx:end_idx],
                prompts=prompts_list[start_idx:end_idx],
                labels=labels_list[start_idx:end_idx],
            )
            r_refs.append(r)
        return [r.result() for r in r_refs]


def update_samples_with_rewards(rewards_info, samples_list):
    """Process rewards info and update samples with rewards, scores and extra logs.

    Args:
        rewards_info: List of reward information dictionaries
        samples_list: List of Experience objects to update
    """
    # Process rewards and scores
    samples_len = [len(sample.sequences) for sample in samples_list]

    rewards_list = torch.cat([torch.as_tensor(info["rewards"]) for info in rewards_info], dim=0).split(samples_len)
    if "scores" in rewards_info[0]:
        scores_list = torch.cat([torch.as_tensor(info["scores"]) for info in rewards_info], dim=0).split(samples_len)
    else:
        scores_list = rewards_list

    # Process extra_logs if present
    if "extra_logs" in rewards_info[0]:
        # Merge all extra_logs tensors first
        merged_logs = {
            key: torch.cat([logs[key] for logs in [info["extra_logs"] for info in rewards_info]], dim=0).split(
                samples_len
            )
            for key in rewards_info[0]["extra_logs"].keys()
        }

    # Update samples with rewards, scores and extra logs
    for i, samples in enumerate(samples_list):
        samples.rewards = rewards_list[i]
        samples.scores = scores_list[i]
        samples.info["score"] = scores_list[i]
        samples.info["reward"] = rewards_list[i]
        if "extra_logs" in rewards_info[0]:
            for key, values in merged_logs.items():
                samples.info[key] = values[i]

    return samples_list
