"""HTTP/1.1 on asyncio Protocols with httptools: the proxy's listeners and upstream pool."""
