"""What a trainer imports: ``RewardClient``, length penalties, the verl and TRL adapters."""
