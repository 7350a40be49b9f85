import WeirCore
print("route lookup benchmark: not written yet")
