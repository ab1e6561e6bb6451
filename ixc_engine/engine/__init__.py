"""Engine: sequences, host core (block manager, planner), scheduler and runner."""
