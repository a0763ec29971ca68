"""Automated red-teaming: ``posttrain redteam`` searches for attacks (jailbreak templates, an
attacker model, or both) that make a target model comply with harmful requests, keeps the
successes, summarises success rates, and turns the successes into DPO pairs."""
