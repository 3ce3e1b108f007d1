#include <cstdio>

#include "greet/greet.h"

int main() {
  if (greet::Greeting("x") != "hello, x") {
    std::puts("FAIL: Greeting");
    return 1;
  }
  std::puts("PASS");
  return 0;
}
