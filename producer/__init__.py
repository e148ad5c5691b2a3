"""What a trainer imports: the clients, the length penalties and the reward formula (the
trainer adapters are ``rewardq.integrations``)."""
