"""The engine: requests, KV block manager, scheduler, model runner, and the loop that drives them."""
