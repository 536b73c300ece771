"""Ray: worker actors, the controller actor (a state machine), and failure policies."""
