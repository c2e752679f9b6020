"""Development and demo helpers, not the product: a throwaway local Label Studio (random admin credentials
per launch, loopback only) and a uvicorn server in a thread. `tandem demo` and the tests use them; the
server never imports them."""
