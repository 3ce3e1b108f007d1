#include <iostream>

#include "greet/greet.h"

int main() {
  std::cout << greet::Greeting("farm") << std::endl;
  return 0;
}
