"""``rewardq serve``: the HTTP gateway every trainer and language can call."""
